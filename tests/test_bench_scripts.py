"""The benchmark scripts run end to end on a CPU and print plausible numbers: bench/bench_train.py (hf-vram's pretrain
path against a plain PyTorch loop) for a few steps, and bench/gpu_gpt2_mfu.py's --dry-run (its GPU code path at a tiny
size, fp32, no compile)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_script(*args: str, timeout: float = 300) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def number(pattern: str, text: str) -> float:
    m = re.search(pattern + r"\s*:\s*([0-9.]+(?:e[-+]?\d+)?)", text)
    assert m, f"no line matching {pattern!r} in:\n{text}"
    return float(m.group(1))


def check_numbers(out: str) -> None:
    assert number(r"ratio hf-vram / plain", out) > 0
    for side in ("hf-vram", "plain"):
        assert 0 < number(rf"MFU {side}", out) < 1.5


def test_bench_train_few_steps():
    out = run_script("bench/bench_train.py", "--steps", "6", "--warmup", "2", "--batch", "8")
    check_numbers(out)
    assert number(r"hf-vram \(pretrain, Trainer\)", out) > 0 and number(r"plain PyTorch loop", out) > 0  # tokens/s
    assert "hf-vram settings" in out and "plain settings" in out
    # The same init, blocks, optimizer and schedule on both sides: the first logged loss agrees (the bench undoes
    # the (T - 1) / T scale of the Trainer's label count where the Trainer has it).
    m = re.search(r"mean loss logged at step 1 / \d+: hf-vram ([0-9.]+) / [0-9.]+, plain ([0-9.]+) /", out)
    assert m, out
    assert abs(float(m.group(1)) - float(m.group(2))) < 1e-3


def test_gpu_gpt2_mfu_dry_run(tmp_path):
    table = tmp_path / "mfu.md"
    out = run_script("bench/gpu_gpt2_mfu.py", "--dry-run", "--out", str(table))
    check_numbers(out)
    text = table.read_text()
    assert "| hf-vram (pretrain, Trainer) |" in text and "| plain PyTorch loop |" in text
    check_numbers(text)


def test_bench_diffusion_prints_the_ratio():
    out = run_script("bench/bench_diffusion.py", "--steps", "3", timeout=120)
    assert number(r"ratio hf-vram / plain", out) > 0
    assert number(r"hf-vram \(diffusion, Accelerate\) images/s", out) > 0
    assert number(r"plain diffusers loop images/s", out) > 0


def test_gpu_diffusion_check_dry_run(tmp_path):
    """The GPU check's path on the CPU: a shipped latent-space recipe with its frozen VAE replaced by a random one
    of the same config, trained one step at a tiny size through the real runner, next to its plan."""
    table = tmp_path / "diffusion.md"
    out = run_script("bench/gpu_diffusion_check.py", "--dry-run", "--steps", "1", "--recipes", "dit-s2-cifar10",
                     "--out", str(table), timeout=300)
    row = json.loads(next(line for line in out.splitlines() if line.startswith('{"recipe"')))
    assert row["recipe"] == "dit-s2-cifar10" and row["steps"] == 1 and row["predicted_gib"] > 0
    assert "| dit-s2-cifar10 | 1 | 64 | 1 |" in table.read_text()
