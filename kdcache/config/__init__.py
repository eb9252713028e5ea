"""Typed pipeline configs: frozen dataclasses loaded from YAML, strict keys, ranges and head-specific rules checked
at load, dotted overrides. The schema (schema.py), the rules across fields (rules.py), loading (load.py) and the
reference renderer (reference.py); the generic machinery (coercion, checks, errors) is in typedconfig.py. Every
name is importable from `kdcache.config`, as before the split."""

from ..typedconfig import ConfigError, build, to_dict
from .load import find_pipeline, load_pipeline, with_limit
from .reference import config_reference
from .rules import STANDARD_SPLITS, check_lm_loss, student_families
from .schema import (EXTRA_INHERITS, MIN_STEPS, POOLINGS, PRECISIONS, AugmentConfig, CacheConfig, ChatConfig, DataConfig, GenerateConfig,
                     FeatureLossConfig, FeaturesConfig, FinetuneConfig, LifelongConfig, LossConfig, PipelineConfig,
                     RoundConfig, SanityConfig, StudentConfig, TaskConfig, TeacherConfig, TrainConfig)

__all__ = ["ConfigError", "build", "load_pipeline", "to_dict", "find_pipeline", "with_limit", "config_reference",
           "check_lm_loss", "student_families", "STANDARD_SPLITS", "EXTRA_INHERITS", "MIN_STEPS", "POOLINGS",
           "PRECISIONS", "AugmentConfig", "CacheConfig", "ChatConfig", "DataConfig", "GenerateConfig", "FeatureLossConfig", "FeaturesConfig",
           "FinetuneConfig", "LifelongConfig", "LossConfig", "PipelineConfig", "RoundConfig", "SanityConfig",
           "StudentConfig", "TaskConfig", "TeacherConfig", "TrainConfig"]
