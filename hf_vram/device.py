"""What the machine offers, and the dtypes that follow from it (one place for every 'auto')."""

from __future__ import annotations

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


def cuda_bf16() -> bool:
    return has_cuda() and torch.cuda.is_bf16_supported()


def mixed_precision(choice: str) -> str:
    """auto -> bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU (CPU autocast brings no gain here)."""
    if choice != "auto":
        return choice
    if not has_cuda():
        return "fp32"
    return "bf16" if cuda_bf16() else "fp16"


def accelerate_mixed_precision(choice: str) -> str:
    """train.precision as Accelerate's mixed_precision argument ("no" for fp32), by the same rule."""
    return {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[mixed_precision(choice)]


def torch_dtype(choice: str) -> torch.dtype:
    """auto -> bfloat16 / float16 / float32 by the same rule as mixed_precision."""
    if choice == "auto":
        choice = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[mixed_precision("auto")]
    return getattr(torch, choice)
