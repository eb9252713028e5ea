"""`kdcache config --reference`: the Markdown reference of every config field (docs/configuration.md), rendered from
the schema's help lines and checks. Imports no torch."""

from __future__ import annotations

import dataclasses
import re
import typing

from .schema import (AugmentConfig, CacheConfig, ChatConfig, DataConfig, GenerateConfig, FeatureLossConfig, FeaturesConfig, FinetuneConfig,
                     LifelongConfig, LossConfig, PipelineConfig, RoundConfig, SanityConfig, StudentConfig, TaskConfig,
                     TeacherConfig, TrainConfig)

def config_reference(classes: typing.Sequence[type] | None = None) -> str:
    """Markdown reference of every config field, from the dataclasses' help lines."""
    classes = classes or [PipelineConfig, TaskConfig, DataConfig, AugmentConfig, ChatConfig, GenerateConfig,
                          TeacherConfig, FinetuneConfig,
                          SanityConfig, CacheConfig, FeaturesConfig, StudentConfig, TrainConfig, LossConfig,
                          FeatureLossConfig, LifelongConfig, RoundConfig]
    out = []
    for cls in classes:
        out += [f"## `{cls.__name__}`", "", (cls.__doc__ or "").strip(), "",
                "| key | type | default | meaning |", "|---|---|---|---|"]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "required"
            if dataclasses.is_dataclass(default):
                default = "(see below)"
            tp = re.sub(r"\b(typing|kdcache\.config\.schema|kdcache\.config)\.", "", str(hints[f.name]).replace("<class '", "").replace("'>", ""))
            rule = getattr(f.metadata.get("check"), "rule", "")
            out.append(f"| `{f.name}` | `{tp}` | `{default}` | {f.metadata.get('help', '')}"
                       f"{f' ({rule})' if rule else ''} |")
        out.append("")
    return "\n".join(out)
