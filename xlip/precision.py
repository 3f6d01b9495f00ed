"""Mixed precision: what ``train.precision`` means on a device, decided here only.

Training, evaluation, the Python API and ``xlip bench`` all ask :func:`resolve_precision` (through
:func:`autocast`), so ``auto`` means the same everywhere.
"""

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


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"bf16"`` or ``"fp32"``: what ``precision`` (auto | bf16 | fp32) means on ``device``.

    ``auto``: bf16 on GPUs and on CPUs with AMX or AVX512-BF16, fp32 elsewhere."""
    if precision == "auto":
        fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
        return "bf16" if fast else "fp32"
    return "bf16" if precision == "bf16" else "fp32"


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """bf16 autocast where ``precision`` (``train.precision``) resolves to bf16 on ``device``,
    else a disabled one: training and evaluation run under the same rule."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=resolve_precision(precision, device) == "bf16")
