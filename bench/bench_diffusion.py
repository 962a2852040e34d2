"""Training throughput of a small UNet2DModel from scratch: hf-vram's `task: diffusion` path (the shipped
unet-ddpm-64 recipe, made small by overrides -> data_prep.images -> hf_vram.runners.diffusion's Accelerate loop)
against a minimal hand-written diffusers + PyTorch loop in the shape of diffusers'
examples/unconditional_image_generation/train_unconditional.py, on the same model config and init seed, the same
images and batch, DDPMScheduler, AdamW, cosine schedule, clipping, EMA and precision (fp32), in this run.

    make bench            # or: python bench/bench_diffusion.py --steps 20 [--threads 1]

Both sides run for the same number of optimizer steps, one after the other, twice in alternating order
(hf-vram, plain, plain, hf-vram); each side's rate is the better of its two runs. A run's rate counts the images of
steps 2..N over the time from the end of step 1 to the end of step N: the window hf-vram's runner itself reports as
`images_per_second` in train_summary.json (its per-step history file, memory log and progress line inside it; its
start-up, final sample grid and save outside it), and the same window for the plain loop.

Prints images/s of each side, their ratio (hf-vram / plain loop; 1.0 = no overhead) and the settings.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "unet-ddpm-64.yaml"
# The recipe's UNet made small enough for a 2-core CPU: two levels (32 -> 16 px), attention at 16 px, one ResNet
# block per level.
SMALL_UNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}


def overrides_for(output_dir: Path, source: str, resolution: int, batch: int, steps: int, ema: bool) -> list[str]:
    """The small model, a short fp32 run, nothing but training inside the timed steps (no sample grids during
    training, no checkpoint, no TensorBoard writer); the final grid is one image at one DDIM step."""
    out = [f"model.config.{k}={json.dumps(v)}" for k, v in SMALL_UNET.items()]
    return out + [
        f"data.source={source}", f"data.images.resolution={resolution}",
        f"train.output_dir={output_dir}", f"train.micro_batch_size={batch}", "train.grad_accum=1",
        f"train.max_steps={steps}", f"train.save_steps={steps + 1000}", f"train.logging_steps={steps + 1000}",
        "train.report_to=[]", "train.precision=fp32", "train.torch_compile=false",
        "train.gradient_checkpointing=false",
        "diffusion.sample_every=null", "diffusion.num_samples=1", "diffusion.inference_steps=1",
        f"diffusion.ema={str(ema).lower()}",
    ]


# ------------------------------------------------------------------------------------------------ the two sides


def run_hf_vram(loaded) -> tuple[float, dict]:
    """hf-vram's runner end to end; its own steady-state rate (steps 2..N) from train_summary.json."""
    from hf_vram.runners.run import finish, setup

    summary = finish(setup(loaded))
    return float(summary["images_per_second"]), summary


def run_plain(loaded, steps: int) -> tuple[float, float]:
    """train_unconditional.py's loop, by hand: the same UNet2DModel config and init seed, DDPMScheduler, AdamW, cosine
    schedule with warmup, clipping and EMA, on the same images and batch. Returns (images/s of steps 2..N, first loss)."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from data_prep.images import collate, load_images

    r = loaded.recipe
    d, t = r.diffusion, r.train
    torch.manual_seed(t.seed)
    data = load_images(r.data.source, r.data.split, r.data.images, r.data.max_samples)
    px = data.dataset[0]["pixel_values"]
    model = UNet2DModel(**{**r.model.config, "in_channels": px.shape[0], "out_channels": px.shape[0],
                           "sample_size": px.shape[-1]})
    model.train()
    noise_scheduler = DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule,
                                    prediction_type=d.prediction_type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, t.adam_beta2), weight_decay=t.weight_decay)
    warmup = math.ceil(t.warmup * steps) if t.warmup < 1 else int(t.warmup)  # transformers' rule, as the runner
    lr_scheduler = get_scheduler(t.lr_scheduler, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    ema = EMAModel(model.parameters(), decay=d.ema_decay, model_cls=UNet2DModel, model_config=model.config) if d.ema else None
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=t.micro_batch_size, shuffle=True, collate_fn=collate,
                                         drop_last=True, num_workers=0)
    step, images, first_loss, t1 = 0, 0, None, None
    while step < steps:
        for batch in loader:
            clean = batch["pixel_values"]
            noise = torch.randn_like(clean)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],)).long()
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            pred = model(noisy, timesteps, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(model.parameters())
            loss_value = loss.detach().item()
            step += 1
            images += clean.shape[0]
            if step == 1:
                first_loss, t1, images1 = loss_value, time.time(), images
            if step >= steps:
                break
    return (images - images1) / (time.time() - t1), first_loss


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--batch", type=int, default=16, help="micro batch (images per step)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--source", default="builtin:shapes", help="builtin:shapes or builtin:digits")
    p.add_argument("--no-ema", action="store_true", help="train without EMA weights (on both sides)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads, both sides (0: torch's default); on a small machine that other jobs share, "
                        "one thread is steadier and often faster than threads that wait on each other at every kernel")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step is not timed)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from hf_vram.recipe.load import load_recipe

    hf_rates, plain_rates, hf_summary = [], [], None
    with tempfile.TemporaryDirectory(prefix="bench-diffusion-") as tmp:
        def loaded_for(run: int):
            out = Path(tmp) / f"hf-vram-{run}"
            return load_recipe(RECIPE, overrides_for(out, args.source, args.resolution, args.batch, args.steps,
                                                     not args.no_ema))

        loaded = loaded_for(0)
        first_losses = {}
        for run, side in enumerate(("hf-vram", "plain", "plain", "hf-vram")):
            if side == "hf-vram":
                rate, hf_summary = run_hf_vram(loaded_for(run))
                hf_rates.append(rate)
                first_losses.setdefault(side, hf_summary["first_loss"])
            else:
                rate, first = run_plain(loaded, args.steps)
                plain_rates.append(rate)
                first_losses.setdefault(side, first)
            print(f"run {run + 1}/4 {side}: {rate:.1f} images/s", flush=True)

    r = loaded.recipe
    hf, plain = max(hf_rates), max(plain_rates)
    print()
    print(f"settings: UNet2DModel {hf_summary['total_params']:,} parameters {json.dumps(SMALL_UNET)}, "
          f"{r.data.source} ({hf_summary['images']} images) at {r.data.images.resolution}px, "
          f"random_flip {r.data.images.random_flip}, batch {r.train.micro_batch_size}, {args.steps} steps per run "
          f"(steps 2..{args.steps} timed), fp32, {torch.get_num_threads()} CPU thread(s)")
    print(f"hf-vram settings: recipe {RECIPE.name} via hf_vram.runners.diffusion (Accelerate), "
          f"DDPMScheduler {r.diffusion.num_train_timesteps} {r.diffusion.beta_schedule} {r.diffusion.prediction_type}, "
          f"AdamW lr {r.train.lr} betas (0.9, {r.train.adam_beta2}) wd {r.train.weight_decay}, "
          f"{r.train.lr_scheduler} warmup {r.train.warmup}, clip {r.train.max_grad_norm}, "
          f"EMA {'decay ' + str(r.diffusion.ema_decay) if r.diffusion.ema else 'off'}")
    print("plain settings: the same, by hand in train_unconditional.py's shape (UNet2DModel, DDPMScheduler, "
          "torch AdamW, diffusers get_scheduler, clip_grad_norm_, EMAModel), no Accelerate")
    print(f"first loss: hf-vram {first_losses['hf-vram']:.4f}, plain {first_losses['plain']:.4f}")
    print(f"runs (alternating hf-vram, plain, plain, hf-vram): hf-vram {', '.join(f'{x:.1f}' for x in hf_rates)}; "
          f"plain {', '.join(f'{x:.1f}' for x in plain_rates)} images/s")
    print(f"hf-vram (diffusion, Accelerate) images/s: {hf:.2f}")
    print(f"plain diffusers loop images/s: {plain:.2f}")
    print(f"ratio hf-vram / plain: {hf / plain:.3f}")
    return 0 if math.isfinite(hf / plain) else 1


if __name__ == "__main__":
    raise SystemExit(main())
