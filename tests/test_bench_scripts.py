"""The benchmark scripts run end to end on a CPU and print plausible numbers: bench/bench_train.py (hf-vram's pretrain
path against a plain PyTorch loop) and bench/bench_qlora.py (hf-vram's QLoRA against plain trl) for a few steps,
bench/gpu_gpt2_mfu.py's --dry-run (its GPU code path at a tiny size, fp32, no compile), and bench/gpu_check.sh
--dry-run (the GPU machine's one command, its long-context check included, on the CPU at tiny sizes)."""

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


def test_bench_qlora_few_steps():
    """hf-vram's QLoRA path, the same with the full-logits loss, and plain trl, a few steps of each in turn."""
    out = run_script("bench/bench_qlora.py", "--steps", "3", "--warmup", "1", "--batch", "4", "--max-length", "128")
    hf, full = r"hf-vram \(QLoRA, setup/finish\)", r"hf-vram train.fused_loss=false"
    plain = r"plain trl SFTTrainer \(defaults\)"
    for side in (hf, full, plain):
        assert number(side, out) > 0  # tokens/s
    assert number(r"ratio hf-vram / plain", out) > 0
    assert re.search(r"fused loss cost on CPU\s*:\s*[-+][0-9.]+%", out), out
    assert re.search(full + r" settings: .*loss full logits", out)
    assert re.search(hf + r" settings: .*loss trl fused", out)
    # The three sides train the same base on the same batches: with LoRA's B at zero, their first losses agree.
    m = re.search(rf"loss at step 1 .*: {hf} ([0-9.]+), {full} ([0-9.]+), {plain} ([0-9.]+)", out)
    assert m, out
    first = [float(v) for v in m.groups()]
    assert max(first) - min(first) < 1e-3, first


def test_gpu_check_dry_run(tmp_path):
    """bench/gpu_check.sh --dry-run: the GPU machine's one command on the CPU. The long-context check runs every
    setting at tiny lengths through the runner under a cap on live tensors, so that its out-of-memory path, the skip
    after it and the longest-sequence bisection run here; GPT-2's MFU check runs its dry run."""
    env = {**os.environ, "PY": sys.executable, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = proc.stdout
    rows = [json.loads(line)["row"] for line in out.splitlines() if line.startswith('{"row"')]
    settings = ["all savings on", "unquantized fp32", "fused loss off", "offloading off", "tiled MLP off"]
    assert [r["setting"] for r in rows[::3]] == settings and len(rows) == 15
    by = {(r["setting"], r["tokens"]): r for r in rows}
    assert all(by[(s, 64)]["status"] == "ok" and by[(s, 64)]["allocated"] > 0 for s in settings)
    assert all(r["plan_reserved"] > 0 for r in rows)
    assert any(r["status"] == "OOM" for r in rows)
    # Each setting reached the trainer it names, and nothing else changed.
    on = by[("all savings on", 64)]["savings"]
    assert "loss fused" in on and "offload HostCopies" in on and "tiled MLPs 2" in on
    assert by[("fused loss off", 64)]["savings"] == on.replace("loss fused", "loss full logits")
    assert by[("offloading off", 64)]["savings"] == on.replace("offload HostCopies", "offload nullcontext")
    assert by[("tiled MLP off", 64)]["savings"] == on.replace("tiled MLPs 2", "tiled MLPs 0")
    assert by[("unquantized fp32", 64)]["savings"] == on  # the compute dtype is fp32 on a CPU: the same head
    longest = next(json.loads(line)["longest"] for line in out.splitlines() if line.startswith('{"longest"'))
    best_swept = max(r["tokens"] for r in rows if r["setting"] == "all savings on" and r["status"] == "ok")
    assert longest["measured"] >= best_swept and longest["plan"] > 0
    speed = next(json.loads(line)["speed"] for line in out.splitlines() if line.startswith('{"speed"'))
    assert speed["hf_vram"] > 0 and speed["plain"] > 0
    table = (tmp_path / "gpu_longctx.md").read_text()
    assert "| all savings on | 64 | ok |" in table and "ratio hf-vram / plain:" in table
    check_numbers((tmp_path / "gpt2_mfu.md").read_text())
