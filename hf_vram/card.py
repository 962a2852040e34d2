"""The model card (README.md) written into every output directory, with Hub metadata."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from hf_vram.recipe.load import LoadedRecipe


def _hub_id(ref: str | None) -> str | None:
    """A Hub id for card metadata, or None for local paths and recipe dependencies."""
    if not ref or ref.startswith(("recipe:", ".", "/", "~")) or Path(ref).exists() or ref.count("/") != 1:
        return None
    return ref


def model_card(loaded: LoadedRecipe, summary: dict) -> ModelCard:
    r = loaded.recipe
    adapter = r.adapter.type != "none"
    base = _hub_id(r.model.name_or_path)
    dataset = _hub_id(r.data.source)
    tags = ["hf-vram", "text-generation"]
    if adapter:
        tags += ["lora", "peft"] + (["qlora", f"{r.quant.bits}-bit"] if r.quant.bits else [])
    data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        pipeline_tag="text-generation",
        base_model=base,
        datasets=[dataset] if dataset else None,
        tags=tags,
    )
    what = (
        f"a {r.adapter.type.upper()} adapter (r={r.adapter.r}, alpha={r.adapter.alpha}) on "
        f"`{r.model.name_or_path}`" + (f" loaded in {r.quant.bits}-bit {r.quant.type}" if r.quant.bits else "")
        if adapter
        else (f"a `{r.model.arch}` model trained from scratch" if r.model.arch else f"a full fine-tune of `{r.model.name_or_path}`")
    )
    rows = "\n".join(
        f"| {k} | {v} |"
        for k, v in [
            ("data", f"`{r.data.source}` ({r.data.format}, max length {r.data.max_length}, packing {r.data.packing})"),
            ("steps", summary.get("global_step")),
            ("global batch", f"{r.train.micro_batch_size} x {r.train.grad_accum} x {summary.get('world_size', 1)} processes"),
            ("learning rate", f"{r.train.lr} ({r.train.lr_scheduler})"),
            ("optimizer", r.train.optimizer),
            ("final training loss", summary.get("final_loss")),
            ("trainable / total parameters", f"{summary.get('trainable_params')} / {summary.get('total_params')}"),
        ]
    )
    scores = ""
    if "score_before" in summary:
        b, a = summary["score_before"], summary["score_after"]
        scores = f"\n## Evaluation\n\nHeld-out exact match: {b['accuracy']:.1%} before training, {a['accuracy']:.1%} after ({a['correct']}/{a['total']}).\n"
    text = f"""---
{data.to_yaml()}
---

# {loaded.name}

{r.description}

This is {what}, trained with hf-vram from the recipe `{loaded.name}` (the resolved recipe is `recipe.yaml`).

## Use

```python
from transformers import pipeline

pipe = pipeline("text-generation", model="{r.hub.repo_id or 'PATH_TO_THIS_DIRECTORY'}")
print(pipe("Hello", max_new_tokens=32)[0]["generated_text"])
```

## Training

| setting | value |
|---|---|
{rows}
{scores}"""
    return ModelCard(text)
