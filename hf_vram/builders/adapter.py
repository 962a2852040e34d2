"""adapter section -> a peft config (the only place one is built)."""

from __future__ import annotations

from peft import AdaptionPromptConfig, LoraConfig, PeftConfig

from hf_vram.recipe.schema import AdapterSection


def adapter_config(adapter: AdapterSection, new_token_ids: list[int] | None = None, tied_embeddings: bool = True) -> PeftConfig | None:
    """peft config of the recipe's adapter; new_token_ids are vocabulary rows added for the recipe (a chat
    template's tokens) whose embeddings must be learned beside the adapter and saved with it."""
    if adapter.type == "none":
        return None
    if adapter.type == "llama-adapter":
        # LLaMA-Adapter (arXiv 2303.16199): learned prompts with zero-init gates in the top layers.
        return AdaptionPromptConfig(adapter_len=adapter.prompt_length, adapter_layers=adapter.prompt_layers, task_type="CAUSAL_LM")
    trainable_tokens = None
    if new_token_ids:
        # Only the new rows train (peft's TrainableTokens), not the whole embedding matrix; an untied output
        # layer needs its rows too, or the model could read the new tokens but never write them.
        trainable_tokens = {"embed_tokens": new_token_ids} if tied_embeddings else {"embed_tokens": new_token_ids, "lm_head": new_token_ids}
    return LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=adapter.target_modules,
        use_dora=adapter.type == "dora",
        use_rslora=adapter.type == "rslora",
        trainable_token_indices=trainable_tokens,
        bias="none",
        task_type="CAUSAL_LM",
    )
