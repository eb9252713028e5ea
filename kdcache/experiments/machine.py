"""The machine a measurement ran on, in one line (for every generated doc section)."""

from __future__ import annotations

import os
import platform

import torch


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core {cpu}, {gpu}, torch {torch.__version__}, {platform.system()}"
