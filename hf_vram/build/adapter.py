"""adapter section -> peft.LoraConfig (the only place it is built)."""

from __future__ import annotations

from peft import LoraConfig

from hf_vram.recipe.schema import AdapterSection


def lora_config(adapter: AdapterSection) -> LoraConfig | None:
    if adapter.type == "none":
        return None
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
