"""Mixed precision: what ``train.precision`` means on a device, decided here only.

Training, evaluation, the Python API and ``xlip bench`` all ask :func:`resolve_precision` (through
:func:`autocast`), so ``auto`` means the same everywhere. :func:`set_tf32` decides the precision of
the fp32 matmuls and convolutions that autocast leaves in fp32 (``train.tf32``), on GPUs only.
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


def set_tf32(enabled: bool, device: torch.device) -> bool:
    """TF32 tensor cores for fp32 matmuls and cuDNN convolutions on ``device`` (``train.tf32``):
    a 10-bit mantissa for the products, fp32 accumulation, several times the fp32 speed on
    Ampere and later GPUs. Only CUDA has it: on other devices nothing is changed. Returns whether
    the switches were set (they are process-wide, as in PyTorch)."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return True
