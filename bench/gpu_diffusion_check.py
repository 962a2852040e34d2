"""Every shipped diffusion recipe through the real runner on a CUDA card, its measured peak against `hf-vram plan`.

The CPU suite cannot reach the runner's GPU path (bf16 mixed precision, frozen parts cast to bf16, 8-bit AdamW,
CUDA peak counters). Here each shipped diffusion recipe trains a few steps at its real model size, resolution and
micro-batch, with what needs the Hub replaced offline: the images by builtin:shapes (RGB, captions, classes) and
the frozen VAE and text encoder by random ones of the same configs (hf-vram's table of them), saved locally with a
BPE tokenizer trained on the captions. Then the run's torch.cuda.max_memory_allocated is compared with the plan's
step peak (its CUDA context and allocator slack excluded: torch does not count them). Rows are appended as they come.
    python bench/gpu_diffusion_check.py [--out gpu_diffusion.md] [--steps 4] [--dry-run]
--dry-run: the same path on the CPU at a tiny micro-batch and resolution (no comparison), to check the script.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from hf_vram.recipe.load import load_recipe, shipped_recipes  # noqa: E402
from hf_vram.vram.estimate import GiB  # noqa: E402
from hf_vram.vram.gpus import get_gpu  # noqa: E402


def frozen_parts(recipe, folder: Path) -> list[str]:
    """Random frozen parts of the recipe's configs, saved under folder: the overrides that name them."""
    from diffusers import AutoencoderKL

    from data_prep.images import shapes_images
    from data_prep.tokenizer import train_bpe
    from hf_vram.vram.diffusion_plan import frozen_text_encoder, text_encoder_config, vae_config

    d = recipe.diffusion
    overrides = []
    if d.vae:
        config = {k: v for k, v in vae_config(d.vae).items() if not k.startswith("_")}
        AutoencoderKL(**config).save_pretrained(folder / "vae")
        overrides.append(f"diffusion.vae={folder / 'vae'}")
    if d.conditioning == "text" and d.text_encoder:
        from data_prep.images import SHAPE_CLASS_NAMES

        _, labels = shapes_images(200)
        captions = [f"a {SHAPE_CLASS_NAMES[i]}" for i in labels]
        config = text_encoder_config(d.text_encoder)
        tok = train_bpe(captions, min(config.vocab_size, 1000), d.max_caption_length)
        frozen_text_encoder(config).save_pretrained(folder / "text")
        tok.save_pretrained(folder / "text")
        overrides.append(f"diffusion.text_encoder={folder / 'text'}")
    return overrides


def check(name: str, folder: Path, steps: int, dry_run: bool) -> dict:
    from hf_vram.runners.run import train
    from hf_vram.vram.diffusion_plan import plan_diffusion

    shipped = load_recipe(name)
    overrides = frozen_parts(shipped.recipe, folder) + [
        "data.source=builtin:shapes", "data.images.channels=3", "data.max_samples=256", f"train.max_steps={steps}",
        f"train.output_dir={folder / 'out'}", "train.save_steps=100000", "train.report_to=[]",
        "diffusion.num_samples=4", "diffusion.inference_steps=2", "diffusion.sample_every=null",
    ]
    if dry_run:  # the CPU path at a size a CPU steps through in seconds
        overrides += ["train.micro_batch_size=1", "train.grad_accum=1",
                      f"data.images.resolution={64 if shipped.recipe.diffusion.vae else 32}"]
    loaded = load_recipe(name, overrides)
    gpu = get_gpu("h100")  # the plan's items do not depend on the card; the card's own memory is checked below
    plan = plan_diffusion(loaded, gpu)
    start = time.time()
    summary = train(loaded)
    row = {"recipe": name, "micro_batch": loaded.recipe.train.micro_batch_size,
           "resolution": loaded.recipe.data.images.resolution, "steps": summary["global_step"],
           "seconds": round(time.time() - start, 1), "predicted_gib": round(plan.step_peak / GiB, 3),
           "images_per_second": summary.get("images_per_second")}
    if "cuda_max_allocated_bytes" in summary:
        measured = summary["cuda_max_allocated_bytes"]
        row["measured_gib"] = round(measured / GiB, 3)
        row["error"] = f"{(plan.step_peak - measured) / measured:+.1%}"
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_diffusion.md")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--recipes", nargs="*", help="default: every shipped diffusion recipe")
    args = p.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    names = args.recipes or [n for n, path in shipped_recipes().items() if load_recipe(str(path)).recipe.task == "diffusion"]
    out = Path(args.out)
    out.write_text("| recipe | micro-batch | px | steps | s | images/s | predicted GiB | measured GiB | error |\n"
                   "|---|---|---|---|---|---|---|---|---|\n")
    for name in names:
        folder = Path(tempfile.mkdtemp(prefix=f"hf-vram-{name}-"))
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            row = check(name, folder, args.steps, args.dry_run)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(f"| {name} | {row['micro_batch']} | {row['resolution']} | {row['steps']} | {row['seconds']} | "
                    f"{row['images_per_second']} | {row['predicted_gib']} | {row.get('measured_gib', '-')} | "
                    f"{row.get('error', '-')} |\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
