"""The model card of a diffusion output: Hub metadata (library diffusers, pipeline tag, tags) and how the pipeline
was trained and is used."""

from __future__ import annotations

import json

from hf_vram.builders.diffusion import is_custom_pipeline, pipeline_name
from hf_vram.builders.diffusion_archs import ARCHS, CUSTOM_PIPELINE_MODULE
from hf_vram.output.cards.common import front_matter, table
from hf_vram.recipe.load import LoadedRecipe


def _call(loaded: LoadedRecipe) -> str:
    """The pipeline call that draws images as the run's sample grids were drawn."""
    r, d = loaded.recipe, loaded.recipe.diffusion
    if d.conditioning == "class":
        return (f"pipe(class_labels=[0, 1, 2, 3], num_inference_steps={d.inference_steps}, "
                f"guidance_scale={d.guidance_scale}).images")
    if d.conditioning == "text":
        prompt = (d.sample_prompts or ["a photo"])[0]
        extra = "".join(f", {k}={v!r}" for k, v in ARCHS[r.model.arch].sample_kwargs.items())
        return (f"pipe({prompt!r}, num_inference_steps={d.inference_steps}, guidance_scale={d.guidance_scale}"
                f"{extra}).images")
    return f"pipe(batch_size=4, num_inference_steps={d.inference_steps}).images"


def _rows(loaded: LoadedRecipe, summary: dict) -> list[tuple[str, object]]:
    r, d = loaded.recipe, loaded.recipe.diffusion
    rows = [
        ("recipe", f"`{loaded.name}` (task diffusion)"),
        ("model", f"`{r.model.arch}` from scratch, {summary.get('total_params', 0):,} parameters, {d.conditioning} conditioning"),
        ("data", f"`{r.data.source}` ({summary.get('images')} images at {r.data.images.resolution if r.data.images else '?'} px)"),
        ("space", f"latents of `{d.vae}`" if d.vae else "pixel space"),
        ("noise", f"{d.beta_schedule} schedule, {d.num_train_timesteps} steps, {d.prediction_type} prediction"
                  + (f", min-SNR gamma {d.snr_gamma}" if d.snr_gamma else "")),
        ("optimizer steps", summary.get("global_step")),
        ("loss", f"{summary.get('first_loss', 0):.4f} -> {summary.get('final_loss', 0):.4f}"),
        ("EMA", f"decay {d.ema_decay} (saved weights)" if d.ema else "off"),
        ("sampler", f"{d.sampler}, {d.inference_steps} steps"),
    ]
    if "images_per_second" in summary:
        rows.append(("throughput", f"{summary['images_per_second']} images/s"))
    return rows


def diffusion_card(loaded: LoadedRecipe, summary: dict) -> str:
    r, d = loaded.recipe, loaded.recipe.diffusion
    tag = "text-to-image" if d.conditioning == "text" else "unconditional-image-generation"
    meta = {"library_name": "diffusers", "pipeline_tag": tag, "tags": ["hf-vram", loaded.name, "diffusers", r.model.arch]}
    if r.hub.repo_id:
        meta["model-index"] = [{"name": r.hub.repo_id}]
    where = r.hub.repo_id or str(loaded.output_dir)
    name = pipeline_name(r.model.arch, d.conditioning, bool(d.vae))
    trust, custom = "", ""
    if is_custom_pipeline(name):
        trust = ", trust_remote_code=True"
        custom = (f"`{name}` is not one of diffusers' pipelines: its code is `{CUSTOM_PIPELINE_MODULE}.py` in this "
                  "repository (torch and diffusers only), which `trust_remote_code=True` lets diffusers import.\n\n")
    return (
        front_matter(meta) + "\n"
        f"# {loaded.name}\n\n{r.description}\n\nTrained with hf-vram from the recipe `{loaded.name}` (the resolved recipe is `recipe.yaml`).\n\n"
        "## Usage\n\n```python\nfrom diffusers import DiffusionPipeline\n\n"
        f"model_id = {json.dumps(where)}\npipe = DiffusionPipeline.from_pretrained(model_id{trust})\n"
        f"images = {_call(loaded)}\n```\n\n{custom}"
        f"## Training\n\n{table(_rows(loaded, summary), head=('', ''))}\n"
    )
