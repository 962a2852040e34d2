"""quant section -> transformers.BitsAndBytesConfig (the only place it is built)."""

from __future__ import annotations

import os

import torch
from transformers import BitsAndBytesConfig

from hf_vram.device import torch_dtype
from hf_vram.recipe.schema import QuantSection


def bnb_config(quant: QuantSection) -> BitsAndBytesConfig | None:
    if quant.bits is None:
        return None
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch_dtype(quant.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute,
        # Under FSDP / DeepSpeed the packed 4-bit blocks are stored in the compute dtype so that they can be
        # sharded with the other weights (the FSDP-QLoRA approach); otherwise bitsandbytes' default uint8.
        bnb_4bit_quant_storage=compute if sharded_launch() else torch.uint8,
    )


def sharded_launch() -> bool:
    """True under `accelerate launch` with an FSDP or DeepSpeed config (accelerate sets these variables)."""
    return any(os.environ.get(v, "").lower() == "true" for v in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))

