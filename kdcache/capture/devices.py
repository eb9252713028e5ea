"""Which device and compute dtype a teacher runs on, from `teacher.device` and `teacher.precision`."""

from __future__ import annotations

import torch


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU unless asked otherwise (bf16 is ~5x slower on CPUs without AVX-512); bf16/fp16 autocast on GPU."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def placed(model: torch.nn.Module) -> bool:
    """Whether the model sits where accelerate (`teacher.device_map`) or transformers' tensor parallelism
    (`teacher.tp_plan`) put it, so that nothing may move it as a whole."""
    return bool(getattr(model, "hf_device_map", None) or getattr(model, "tp_size", None))
