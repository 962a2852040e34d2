"""The runner of task assemble: a recipe's moe section -> hf_vram.moe.assemble -> an output directory like any
other (model, tokenizer, recipe.yaml, model card, train_summary.json), so that a fine-tune recipe can name it as
`model.name_or_path: recipe:NAME` and the chain builds it first."""

from __future__ import annotations

from pathlib import Path

from hf_vram.atomic import atomic_write_json, atomic_write_text
from hf_vram.recipe.load import LoadedRecipe

SUMMARY = "train_summary.json"


def spec_of(loaded: LoadedRecipe):
    """The AssembleSpec of a recipe, every recipe:NAME reference trained (or assembled) first."""
    from hf_vram.moe.assemble import AssembleSpec, ExpertSpec
    from hf_vram.train.lm import resolve_reference

    r = loaded.recipe
    experts = [ExpertSpec(resolve_reference(loaded, e.source_model), list(e.positive_prompts), list(e.negative_prompts))
               for e in r.moe.experts]
    return AssembleSpec(base_model=resolve_reference(loaded, r.model.name_or_path), experts=experts,
                        gate_mode=r.moe.gate_mode, dtype=r.moe.dtype, experts_per_token=r.moe.experts_per_token,
                        seed=r.train.seed)


def assemble_recipe(loaded: LoadedRecipe) -> dict:
    from hf_vram.moe.assemble import assemble

    out = loaded.output_dir
    spec = spec_of(loaded)
    if out.is_dir() and not (out / SUMMARY).is_file():
        # A folder without a summary is an assembly that did not finish (assemble writes beside it and renames).
        import shutil

        shutil.rmtree(out)
    tokenizer = resolve_tokenizer(loaded)
    assemble(spec, out, tokenizer_source=tokenizer)
    atomic_write_text(out / "recipe.yaml", loaded.resolved_yaml())
    summary = {"recipe": loaded.name, "task": "assemble", "experts": [e.source_model for e in spec.experts],
               "base_model": spec.base_model, "gate_mode": spec.gate_mode, "experts_per_token": spec.experts_per_token,
               "total_params": _parameters(out)}
    atomic_write_text(out / "README.md", assembled_card(loaded, summary))
    atomic_write_json(out / SUMMARY, summary)
    print(f"[hf-vram] assembled {len(spec.experts)} experts into {out} ({summary['total_params']:,} parameters)", flush=True)
    return summary


def resolve_tokenizer(loaded: LoadedRecipe) -> str | None:
    from hf_vram.train.lm import resolve_reference

    return resolve_reference(loaded, loaded.recipe.tokenizer.name_or_path)


def _parameters(out: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                shape = st.get_slice(k).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def assembled_card(loaded: LoadedRecipe, summary: dict) -> str:
    """A model card for the assembled model: what it was built from and how to load it."""
    r = loaded.recipe
    bases = [summary["base_model"], *summary["experts"]]
    hub_bases = [b for b in dict.fromkeys(bases) if not Path(b).exists()]
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- hf-vram", "- moe",
             "- mixtral", f"- {loaded.name}"]
    if hub_bases:
        front += ["base_model:", *[f"- {b}" for b in hub_bases]]
    front.append("---")
    experts = "\n".join(
        f"| {i} | `{e.source_model}` | {', '.join(repr(p) for p in e.positive_prompts) or '-'} |"
        for i, e in enumerate(r.moe.experts))
    model_id = r.hub.repo_id or str(loaded.output_dir)
    return "\n".join(front) + f"""

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


def assemble_file(path: str, output_dir: str | None, overrides: list[str]) -> dict:
    """`hf-vram assemble FILE`: a recipe with task assemble, or mergekit-moe's own YAML."""
    import yaml

    from hf_vram.errors import UserError
    from hf_vram.moe.assemble import assemble, read_mergekit_yaml
    from hf_vram.recipe.load import find_recipe, load_recipe

    found = find_recipe(path)
    data = yaml.safe_load(Path(found).read_text()) or {}
    if isinstance(data, dict) and "base_model" in data and "experts" in data:
        if overrides:
            raise UserError(f"{found}: overrides apply to hf-vram recipes, not to a mergekit-moe file")
        out = Path(output_dir or f"outputs/{Path(found).stem}")
        spec = read_mergekit_yaml(found)
        assemble(spec, out)
        print(f"[hf-vram] assembled {len(spec.experts)} experts into {out}", flush=True)
        return {"output_dir": str(out), "experts": len(spec.experts)}
    loaded = load_recipe(found, [*overrides, *([f"train.output_dir={output_dir}"] if output_dir else [])])
    if loaded.recipe.task != "assemble":
        raise UserError(f"{found}: task is {loaded.recipe.task}, not assemble; train it with `hf-vram train`")
    from hf_vram.train.lm import train

    return train(loaded)
