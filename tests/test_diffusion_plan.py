"""`hf-vram plan` for task diffusion: the step measured on fake tensors equals the same step on real ones, the
frozen parts and the VAE's encoding are counted, --fit finds a micro-batch that fits (the shipped recipes are
planned in tests/test_vram_plan.py's table)."""

from __future__ import annotations

import pytest
import torch

from hf_vram.recipe.load import load_recipe
from hf_vram.vram.diffusion_plan import DiffusionShapes, fit_diffusion, measure_diffusion_step, plan_diffusion
from hf_vram.vram.gpus import get_gpu

from .conftest import run_cli, write_recipe
from .test_diffusion import TINY_DIT, TINY_PIXART, TINY_UNET, TINY_UNET_COND, tiny_vae, unet_recipe

GPU = get_gpu("rtx4070")


def tiny(tmp_path, arch: str, conditioning: str = "none", vae: bool = False, **diffusion):
    config = {"unet2d": TINY_UNET, "dit": TINY_DIT, "unet2d-condition": TINY_UNET_COND, "pixart": TINY_PIXART}[arch]
    r = unet_recipe(tmp_path / "out", max_steps=10)
    r["model"] = {"arch": arch, "config": dict(config)}
    r["diffusion"] = {"conditioning": conditioning, "max_caption_length": 8, **diffusion}
    if vae:
        r["diffusion"]["vae"] = tiny_vae(tmp_path / "vae")
    return load_recipe(str(write_recipe(tmp_path, f"{arch}-{conditioning}", r)))


CASES = [("unet2d", "none", False, "fp32"), ("unet2d", "class", False, "fp32"), ("dit", "class", True, "fp32"),
         ("unet2d-condition", "text", False, "fp32"), ("pixart", "text", True, "fp32"),
         ("unet2d", "none", False, "bf16"), ("pixart", "text", True, "bf16")]


@pytest.mark.parametrize("arch,conditioning,vae,precision", CASES)
def test_fake_step_equals_the_real_step(tmp_path, arch, conditioning, vae, precision):
    """Shapes-only tensors give the same bytes as real ones, op for op (bf16: under CPU autocast, as on a GPU)."""
    shapes = DiffusionShapes(tiny(tmp_path, arch, conditioning, vae))
    torch.manual_seed(0)
    fake = measure_diffusion_step(shapes, 8, False, precision, fake=True)
    real = measure_diffusion_step(shapes, 8, False, precision, fake=False)
    for key in ("params", "trained", "weights", "grads", "optimizer", "flops"):
        assert fake[key] == real[key], (key, fake[key], real[key])
    # Attention may pick another CPU kernel on fake tensors (its saved statistics differ by a few KiB).
    for key in ("forward_backward", "peak"):
        assert fake[key] == pytest.approx(real[key], rel=0.01), (key, fake[key], real[key])
    assert fake["forward_backward"] > fake["weights"] and fake["flops"] > 0
    if conditioning == "text":  # a text encoder trained from scratch goes through the step with the model
        assert fake["trained"] > fake["params"] and fake["text_params"] > 0


def test_checkpointing_and_batch_move_the_activations(tmp_path):
    loaded = tiny(tmp_path, "unet2d")
    shapes = DiffusionShapes(loaded)
    small, big = measure_diffusion_step(shapes, 8, False, "fp32"), measure_diffusion_step(shapes, 32, False, "fp32")
    act = lambda m: m["forward_backward"] - m["weights"]  # noqa: E731
    assert 3.5 < act(big) / act(small) < 4.1  # activations grow with the batch (weights' grads do not)
    assert big["flops"] == 4 * small["flops"]
    checkpointed = measure_diffusion_step(shapes, 32, True, "fp32")
    assert act(checkpointed) < act(big)


def test_plan_counts_frozen_parts_and_the_vae_encoding(tmp_path):
    loaded = tiny(tmp_path, "dit", "class", vae=True)
    plan = plan_diffusion(loaded, GPU)
    items = {i.name: i.bytes for i in plan.items}
    for name in ("weights", "VAE (frozen)", "gradients", "optimizer states", "EMA weights", "activations",
                 "VAE encoding", "CUDA context + allocator"):
        assert items[name] > 0, name
    # Trained in fp32 with AdamW: gradients = weights, two states, one fp32 EMA copy.
    assert items["gradients"] == items["EMA weights"] == 4 * plan.trainable
    assert items["weights"] >= 4 * plan.trainable  # and the model's buffers (DiT's position table)
    assert items["optimizer states"] == 2 * items["gradients"]
    assert plan.steps == 10 and plan.seconds > 0 and plan.fits
    no_ema = plan_diffusion(load_recipe(str(loaded.path), ["diffusion.ema=false"]), GPU)
    assert "EMA weights" not in {i.name for i in no_ema.items} and no_ema.total < plan.total
    cached = plan_diffusion(load_recipe(str(loaded.path), ["diffusion.cache_latents=true"]), GPU)
    assert "VAE encoding" not in {i.name for i in cached.items} and cached.flops_per_token < plan.flops_per_token
    eight_bit = plan_diffusion(load_recipe(str(loaded.path), ["train.optimizer=adamw_8bit"]), GPU)
    assert {i.name: i.bytes for i in eight_bit.items}["optimizer states"] < items["optimizer states"] / 3


def test_fit_finds_a_micro_batch_and_the_cli_prints_it():
    too_big = ["train.micro_batch_size=512", "train.grad_accum=1"]
    loaded = load_recipe("dit-s2-cifar10", too_big)
    plan = plan_diffusion(loaded, GPU)
    assert not plan.fits  # encoding 512 images of 256px through sd-vae-ft-mse alone is about 40 GiB
    changes, fitted = fit_diffusion(loaded, GPU)
    assert fitted.fits and changes
    micro = int(next(c for c in changes if c.startswith("train.micro_batch_size=")).split("=")[1])
    accum = int(next(c for c in changes if c.startswith("train.grad_accum=")).split("=")[1])
    assert micro * accum == 512 and micro < 512
    refit = plan_diffusion(load_recipe("dit-s2-cifar10", [*too_big, *changes]), GPU)
    assert refit.total == fitted.total
    r = run_cli("plan", "dit-s2-cifar10", *too_big, "--fit", env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "does NOT fit" in r.stdout and f"--fit: {' '.join(changes)}" in r.stdout
    for line in ("VAE (frozen)", "VAE encoding", "activations", "EMA weights", "FLOPs per image", "time:"):
        assert line in r.stdout, line
