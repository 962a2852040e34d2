"""Generation: from an in-memory model (scoring) and from a saved output through transformers.pipeline."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from data_prep.formats import CHAT_FORMATS, alpaca_prompt


def prompt_for(output_dir: str | Path, prompt: str) -> str | list[dict]:
    """Wrap a bare prompt the way the output was trained (read from its saved recipe): Alpaca's template, or a
    user message that the pipeline renders with the chat template saved beside the model."""
    recipe_file = Path(output_dir) / "recipe.yaml"
    if recipe_file.is_file():
        data = yaml.safe_load(recipe_file.read_text()).get("data", {})
        if data.get("format") == "alpaca":
            return alpaca_prompt(prompt, "", data.get("template", "alpaca"))
        if data.get("format") in (*CHAT_FORMATS, "preference", "unpaired"):
            return [{"role": "user", "content": prompt}]
    return prompt


def load_pipeline(output_dir: str | Path):
    """A stock text-generation pipeline on an output directory. transformers' adapter loading handles LoRA-style
    adapters on an unchanged vocabulary; a LLaMA-Adapter (peft's adaption prompt), or an adapter trained with added
    tokens, is loaded through peft's AutoPeftModel and handed to the same pipeline."""
    import json

    from transformers import AutoConfig, AutoTokenizer, pipeline

    import hf_vram.models  # noqa: F401  (outputs of architectures hf-vram adds, RetNet, load through the Auto classes)

    out = str(output_dir)
    # The output's own tokenizer: an adapter's base may lack the chat template (or tokens) it was trained with.
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = Path(output_dir) / "adapter_config.json"
    if config.is_file():
        adapter = json.loads(config.read_text())
        grew = len(tokenizer) > AutoConfig.from_pretrained(adapter["base_model_name_or_path"]).vocab_size
        if adapter.get("peft_type") == "ADAPTION_PROMPT" or grew:
            # peft's loader also resizes the base's embeddings to the saved tokenizer before loading the adapter;
            # transformers' does not.
            from peft import AutoPeftModelForCausalLM

            return pipeline("text-generation", model=AutoPeftModelForCausalLM.from_pretrained(out), tokenizer=tokenizer)
    return pipeline("text-generation", model=out, tokenizer=tokenizer)


def position_limit(config) -> int | None:
    """Longest sequence a model can read when it has a learned position table (GPT-2's n_positions): it has no row
    past the end, and generate() does not crop the context as nanoGPT's sample loop does. None for models whose
    positions are computed (RoPE) or that have none (Mamba, RWKV, RetNet)."""
    return getattr(config, "max_position_embeddings", None) if config.model_type == "gpt2" else None


def room_for(config, prompt_tokens: int, wanted: int) -> int:
    """New tokens that fit in the model's context after the prompt."""
    limit = position_limit(config)
    return max(1, min(wanted, limit - prompt_tokens)) if limit else wanted


def _room(pipe, prompt, wanted: int) -> int:
    """room_for a pipeline's prompt: a string, or chat messages rendered with the tokenizer's template."""
    if position_limit(pipe.model.config) is None:
        return wanted
    text = prompt if isinstance(prompt, str) else pipe.tokenizer.apply_chat_template(prompt, tokenize=False)
    return room_for(pipe.model.config, len(pipe.tokenizer(text).input_ids), wanted)


def pipeline_generate(output_dir: str | Path, prompts: list[str], max_new_tokens: int = 32, raw: bool = False) -> list[str]:
    """Generate with a stock `transformers.pipeline` loading the output directory (model or adapter)."""
    pipe = load_pipeline(output_dir)
    texts = [p if raw else prompt_for(output_dir, p) for p in prompts]
    outs = [pipe(t, max_new_tokens=_room(pipe, t, max_new_tokens), do_sample=False, return_full_text=False) for t in texts]
    return [o[0]["generated_text"] for o in outs]


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 32) -> list[str]:
    """Greedy completions of prompts with a model in memory (left padding, batched)."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = {k: v.to(device) for k, v in batch.items()}
            ids = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            out += tokenizer.batch_decode(ids[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
