"""quant section -> transformers.BitsAndBytesConfig (the only place it is built)."""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig

from hf_vram.device import torch_dtype
from hf_vram.recipe.schema import QuantSection


def bnb_config(quant: QuantSection) -> BitsAndBytesConfig | None:
    if quant.bits is None:
        return None
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
        # Keep the 4-bit blocks in uint8 so that FSDP/DeepSpeed can shard them like any other tensor.
        bnb_4bit_quant_storage=torch.uint8,
    )

