"""Training throughput of a small GPT-2 from scratch: hf-vram (recipe -> trl SFTTrainer on Accelerate)
against a minimal hand-written PyTorch loop on the same model, data and batch, measured in this run.

    make bench            # or: python bench/bench_train.py --steps 40

Prints tokens/s of each and their ratio (hf-vram / plain loop; 1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import copy
import os
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
    """Wall time of the optimizer steps after the first (warm-up) one, and the tokens they trained."""

    def __init__(self):
        self.start = None
        self.end = None

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 1:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


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
        },
    }
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def plain_loop(model, batches, lr: float) -> tuple[float, int]:
    """The baseline: forward, backward, clip, AdamW step, nothing else. Times steps 2..N like StepTimer."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    device = next(model.parameters()).device
    start, tokens = None, 0
    for i, batch in enumerate(batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 0:
            start = time.perf_counter()
        else:
            tokens += int((batch["labels"] != -100).sum())
    return time.perf_counter() - start, tokens


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
        hf_seconds = timer.end - timer.start
        hf_tokens = sum(int((b["labels"] != -100).sum()) for b in batches[1:])

        base_seconds, base_tokens = plain_loop(baseline_model, batches, 1e-3)

    hf_tps, base_tps = hf_tokens / hf_seconds, base_tokens / base_seconds
    n_params = sum(p.numel() for p in baseline_model.parameters())
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"GPT-2 from scratch, {n_params / 1e6:.2f}M parameters, micro-batch {args.batch} x {args.seq} tokens, "
          f"{args.steps - 1} timed steps, {device}")
    print(f"hf-vram (trl SFTTrainer) : {hf_tps:10.0f} tokens/s  ({hf_seconds / (args.steps - 1) * 1000:.1f} ms/step)")
    print(f"plain PyTorch loop       : {base_tps:10.0f} tokens/s  ({base_seconds / (args.steps - 1) * 1000:.1f} ms/step)")
    print(f"ratio hf-vram / plain    : {hf_tps / base_tps:10.3f}")


if __name__ == "__main__":
    main()
