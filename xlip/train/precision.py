"""Mixed-precision choice."""

from __future__ import annotations

from pathlib import Path

import torch


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: without them bf16 matmuls on CPU are several times slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
    return precision == "bf16"


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """bf16 autocast where ``precision`` (``train.precision``) chooses it on ``device``, else a
    disabled one: training and evaluation run under the same rule."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=use_bf16(precision, device))
