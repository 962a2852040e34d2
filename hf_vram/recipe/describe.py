"""One line per validated recipe (`hf-vram validate`): what it trains, on what, where the output goes. Each task of
hf_vram/tasks.py names its function here; nothing is built or loaded."""

from __future__ import annotations

from hf_vram.recipe.load import LoadedRecipe


def describe_language_model(loaded: LoadedRecipe) -> str:
    r = loaded.recipe
    kind = f"{r.adapter.type} adapter on {r.model.name_or_path}" if r.adapter.type != "none" else (
        f"{r.model.arch} from scratch" if r.model.arch else f"full fine-tune of {r.model.name_or_path}"
    )
    quant = f", {r.quant.bits}-bit {r.quant.type} base" if r.quant.bits else ""
    d = r.data
    data = (f"data {d.source} as {d.format}" if not d.sources else
            "data a mixture of " + ", ".join(f"{e.source} as {e.format}" + (f" (weight {e.weight:g})" if e.weight else "")
                                             for e in d.sources))
    return f"{r.task}: {kind}{quant}; {data}; output {loaded.output_dir}"


def describe_diffusion(loaded: LoadedRecipe) -> str:
    r, d = loaded.recipe, loaded.recipe.diffusion
    size = r.data.images.resolution if r.data.images else 64
    return (f"diffusion: {r.model.arch} from scratch, {d.conditioning} conditioning, "
            f"{'latents of ' + d.vae if d.vae else 'pixel space'}; data {r.data.source} at {size}px; "
            f"output {loaded.output_dir}")


def describe_assemble(loaded: LoadedRecipe) -> str:
    r = loaded.recipe
    return (f"assemble: {len(r.moe.experts)} experts, top-{r.moe.experts_per_token}, router {r.moe.gate_mode}, on "
            f"{r.model.name_or_path}; output {loaded.output_dir}")
