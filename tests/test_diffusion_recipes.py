"""The shipped diffusion recipes (task: diffusion), each as a tiny CPU variant of the same recipe file: the model
shrunk to a tiny config of its architecture, the Hub dataset replaced by builtin:digits at 16px, a Hub VAE by a
small random local one, a Hub text encoder by one trained from scratch, all through the command line's dotted
overrides. Everything else (noise schedule, prediction type, sampler, conditioning, min-SNR, EMA, optimizer and
learning-rate schedule, accumulation, checkpointing) is the recipe's own. Each trains with falling loss and its
output loads in a stock `DiffusionPipeline.from_pretrained` and draws an image. A new diffusion recipe in recipes/
is covered without editing this file, as long as its architecture has a tiny config below."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hf_vram.builders.diffusion import pipeline_kwargs
from hf_vram.recipe.load import load_recipe, shipped_recipes
from hf_vram.runners.run import train

from .test_diffusion import TINY_DIT, TINY_PIXART, TINY_UNET, TINY_UNET_COND, losses, tiny_vae

# The tiny model.config of each architecture (replacing the recipe's whole config: its widths and block layouts
# are what make a run too slow for a CPU). The text-conditional UNet cross-attends at 8x8 rather than 16x16: a
# quarter of the attention cost, the same code paths.
TINY = {
    "unet2d": TINY_UNET,
    "dit": TINY_DIT,
    "unet2d-condition": {**TINY_UNET_COND, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                         "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]},
    "pixart": TINY_PIXART,
}
STEPS = 24
IMAGES_PER_STEP = 16
# What the tiny variant replaces in the diffusion section; every other diffusion setting must survive.
REPLACED_DIFFUSION = {"vae", "text_encoder", "inference_steps", "num_samples", "sample_every"}


def diffusion_recipes() -> list[str]:
    return [name for name, path in shipped_recipes().items()
            if load_recipe(path, check_references=False).recipe.task == "diffusion"]


def _value(v) -> str:
    return json.dumps(v) if v is None or isinstance(v, (bool, list, dict)) else str(v)


def tiny_diffusion(name: str, out, vae: str | None = None, *, max_steps: int = STEPS, **extra):
    """The shipped recipe `name`, shrunk to a tiny offline CPU run (overrides as on the command line). `vae`: the
    local 1-channel VAE to use in place of a Hub one, for recipes that name a VAE."""
    shipped = load_recipe(name, check_references=False).recipe
    d, t = shipped.diffusion, shipped.train
    overrides = {
        "model.config": TINY[shipped.model.arch],
        "data.source": "builtin:digits",
        "data.split": "train",
        "data.max_samples": 256,
        "data.images.resolution": 16,
        "data.images.channels": 1,
        "data.images.random_flip": False,
        # A sample grid half way (drawn from the EMA weights) and one at the end, each of a few images in few steps.
        "diffusion.sample_every": max_steps // 2,
        "diffusion.num_samples": 2,
        "diffusion.inference_steps": 2,
        "train.output_dir": str(out),
        "train.max_steps": max_steps,
        # The recipe's accumulation is kept; the micro-batch shrinks so that every step sees the same few images.
        "train.micro_batch_size": max(1, IMAGES_PER_STEP // t.grad_accum),
        # The recipes' rates (1e-4 and below, warmups of hundreds of steps) move a tiny model too little in 24
        # steps; the schedule's shape is kept.
        "train.lr": 2e-3,
        "train.warmup": 2 if t.warmup else 0,
        "train.logging_steps": max_steps // 2,
        "train.save_steps": max_steps // 2,
        "train.report_to": [],
        "train.auto_fit": False,
    }
    if d.vae:
        assert vae, f"{name} names a VAE: give a local one"
        overrides["diffusion.vae"] = vae
    if d.text_encoder:
        overrides["diffusion.text_encoder"] = None
    overrides.update(extra)
    loaded = load_recipe(name, [f"{k}={_value(v)}" for k, v in overrides.items()])
    # What makes the recipe what it is survives the shrinking.
    tiny = loaded.recipe
    keep = set(type(d).model_fields) - REPLACED_DIFFUSION - {k.removeprefix("diffusion.") for k in extra}
    assert tiny.diffusion.model_dump(include=keep) == d.model_dump(include=keep)
    assert (tiny.task, tiny.model.arch, tiny.train.lr_scheduler, tiny.train.optimizer, tiny.train.grad_accum,
            tiny.train.weight_decay, tiny.train.max_grad_norm, tiny.train.precision, tiny.train.gradient_checkpointing) == (
        shipped.task, shipped.model.arch, t.lr_scheduler, t.optimizer, t.grad_accum, t.weight_decay, t.max_grad_norm,
        t.precision, t.gradient_checkpointing)
    return loaded


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from intra-op threads, and on a busy 2-core machine two threads per process
    spin against each other (measured: 6-10x slower steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> str:
    return tiny_vae(tmp_path_factory.mktemp("vae") / "vae")


def test_every_shipped_diffusion_recipe_is_covered():
    names = set(diffusion_recipes())
    assert {"unet-ddpm-64", "dit-s2-cifar10", "unet-text2img-64", "pixart-24m-text2img", "unet-class-digits"} <= names
    for name in names:
        arch = load_recipe(name, check_references=False).recipe.model.arch
        assert arch in TINY, f"{name}: add a tiny model.config for arch {arch} to TINY"


@pytest.mark.parametrize("name", diffusion_recipes())
def test_tiny_variant_of_the_diffusion_recipe_trains_and_loads(name, vae, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    import hf_vram.builders.diffusion as build_module

    out = tmp_path / "out"
    loaded = tiny_diffusion(name, out, vae)
    d = loaded.recipe.diffusion

    # The weights the runner starts from, to tell that training moved every one of them.
    initial = {}
    real_build = build_module.build

    def build_and_record(*args, **kw):
        parts = real_build(*args, **kw)
        initial.update({k: v.detach().clone() for k, v in parts.model.state_dict().items()})
        return parts

    monkeypatch.setattr(build_module, "build", build_and_record)
    summary = train(loaded)

    assert summary["global_step"] == STEPS and summary["mixed_precision"] == "no"
    history = losses(out)
    print(name, "loss", np.mean(history[:5]), "->", np.mean(history[-5:]))
    assert len(history) == STEPS and all(np.isfinite(history))
    assert np.mean(history[-5:]) < np.mean(history[:5]), history
    for step in (STEPS // 2, STEPS):
        assert (out / "samples" / f"step-{step:06d}.png").is_file(), step
    assert (out / f"checkpoint-{STEPS // 2}").is_dir()

    index = json.loads((out / "model_index.json").read_text())
    custom = isinstance(index["_class_name"], list)
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=custom)
    assert (out / "pixel_pipelines.py").is_file() == custom
    model = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    trained = model.state_dict()
    assert trained.keys() == initial.keys()
    unchanged = [k for k in initial if torch.equal(initial[k], trained[k])]
    assert not unchanged, unchanged

    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    if d.conditioning == "text":
        images = pipe(d.sample_prompts[0] if d.sample_prompts else "a handwritten digit 3", num_inference_steps=2,
                      guidance_scale=d.guidance_scale, generator=generator,
                      **pipeline_kwargs(loaded.recipe.model.arch, 16, d.max_caption_length)).images
    elif d.conditioning == "class":
        images = pipe(class_labels=pipe.get_label_ids(["7"]), num_inference_steps=2, guidance_scale=d.guidance_scale,
                      generator=generator).images
    else:
        images = pipe(batch_size=1, num_inference_steps=2, generator=generator).images
    assert len(images) == 1 and images[0].size == (16, 16)
