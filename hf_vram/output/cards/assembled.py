"""The model card of an assembled mixture of experts: what it was built from and how to load it."""

from __future__ import annotations

from pathlib import Path

from hf_vram.output.cards.common import front_matter
from hf_vram.recipe.load import LoadedRecipe


def assembled_card(loaded: LoadedRecipe, summary: dict) -> str:
    r = loaded.recipe
    bases = [summary["base_model"], *summary["experts"]]
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["hf-vram", "moe", "mixtral", loaded.name]}
    hub_bases = [b for b in dict.fromkeys(bases) if not Path(b).exists()]
    if hub_bases:
        meta["base_model"] = hub_bases
    experts = "\n".join(
        f"| {i} | `{e.source_model}` | {', '.join(repr(p) for p in e.positive_prompts) or '-'} |"
        for i, e in enumerate(r.moe.experts))
    model_id = r.hub.repo_id or str(loaded.output_dir)
    return front_matter(meta) + f"""
# {r.hub.repo_id or loaded.name}

{r.description}

A Mixtral-style mixture of experts assembled by hf-vram (`hf-vram assemble`) from dense checkpoints: attention,
norms and embeddings from `{r.model.name_or_path}`, one expert per source model below, {r.moe.experts_per_token}
experts per token, routers initialised with gate mode `{r.moe.gate_mode}`, {summary['total_params']:,} parameters,
saved in {r.moe.dtype}. It is untrained as a whole: fine-tune it (for instance with a QLoRA recipe naming it as
`model.name_or_path: recipe:{loaded.name}`).

| expert | source model | positive prompts |
|---|---|---|
{experts}

## Usage

```python
from transformers import pipeline

model_id = "{model_id}"
pipe = pipeline("text-generation", model=model_id)
print(pipe("{(r.moe.experts[0].positive_prompts or ['Hello'])[0]}", max_new_tokens=32)[0]["generated_text"])
```

Assembly record: `assembly.json`; recipe: `recipe.yaml`.
"""
