"""Training throughput of a small GPT-2 from scratch: hf-vram (recipe -> trl SFTTrainer on Accelerate)
against a minimal hand-written PyTorch loop on the same model, data and batch, measured in this run.

    make bench            # or: python bench/bench_train.py --steps 40

Prints tokens/s of each and their ratio (hf-vram / plain loop; 1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import TrainerCallback  # noqa: E402

from hf_vram.recipe.load import load_recipe  # noqa: E402
from hf_vram.train.lm import prepare  # noqa: E402

GPT2 = {"n_layer": 4, "n_embd": 128, "n_head": 4, "n_positions": 128, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (the Trainer's own loop, logging and callbacks included)."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kw):
        self.stamps.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        """Durations of steps 2..N (step 1 carries one-time set-up on both sides and is left out)."""
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def recipe_file(folder: Path, steps: int, batch: int, seq: int) -> Path:
    data = {
        "description": "bench: GPT-2 small from scratch",
        "model": {"arch": "gpt2", "config": GPT2},
        "tokenizer": {"train": True, "vocab_size": 512},
        "data": {"source": "builtin:arithmetic", "format": "text", "max_length": seq, "packing": True},
        "train": {
            "output_dir": str(folder / "out"), "micro_batch_size": batch, "max_steps": steps, "lr": 1e-3,
            "warmup": 0, "lr_scheduler": "constant", "optimizer": "adamw_torch", "logging_steps": 1000,
            "save_steps": 100000, "report_to": [], "max_grad_norm": 1.0,
            # fp32 on both sides: the plain loop does not autocast, so neither does hf-vram here.
            "precision": "fp32",
        },
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def plain_loop(model, batches, lr: float) -> list[float]:
    """The baseline: forward, backward, clip, AdamW step, nothing else. Durations of steps 2..N."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    device = next(model.parameters()).device
    stamps = []
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory() as tmp:
        run = prepare(load_recipe(recipe_file(Path(tmp), args.steps, args.batch, args.seq)))
        trainer = run.trainer
        # The same batches, in the same order, for the plain loop: taken from hf-vram's own dataloader.
        batches = [{k: v for k, v in b.items() if k in ("input_ids", "labels", "attention_mask", "position_ids")}
                   for _, b in zip(range(args.steps), trainer.get_train_dataloader())]
        baseline_model = copy.deepcopy(run.model)

        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
        hf_steps = timer.step_seconds()
        base_steps = plain_loop(baseline_model, batches, 1e-3)

    # Median step time: robust to the scheduler hiccups of a shared CPU; tokens are the trained (label) tokens.
    tokens_per_step = statistics.mean(int((b["labels"] != -100).sum()) for b in batches[1:])
    hf_step, base_step = statistics.median(hf_steps), statistics.median(base_steps)
    hf_tps, base_tps = tokens_per_step / hf_step, tokens_per_step / base_step
    n_params = sum(p.numel() for p in baseline_model.parameters())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"GPT-2 from scratch, {n_params / 1e6:.2f}M parameters, micro-batch {args.batch} x {args.seq} tokens, "
          f"{args.steps - 1} timed steps, {device}")
    print(f"hf-vram (trl SFTTrainer) : {hf_tps:10.0f} tokens/s  (median {hf_step * 1000:.1f} ms/step)")
    print(f"plain PyTorch loop       : {base_tps:10.0f} tokens/s  (median {base_step * 1000:.1f} ms/step)")
    print(f"ratio hf-vram / plain    : {hf_tps / base_tps:10.3f}")


if __name__ == "__main__":
    main()
