"""Runs survive SIGKILL: resuming ends at the same loss as an uninterrupted run, a half-written checkpoint is
never resumed from, and a non-finite loss stops the run naming the step."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from hf_vram.output.checkpoints import COMPLETE_MARKER, checkpoints, latest_complete

from .conftest import ROOT, run_cli, scratch_recipe, write_recipe

STEPS = 60


def _summary(out):
    return json.loads((out / "train_summary.json").read_text())


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    ref_out, kill_out = tmp_path / "ref", tmp_path / "killed"
    ref = write_recipe(tmp_path, "ref", scratch_recipe(ref_out, max_steps=STEPS, save_steps=5, save_total_limit=2))
    killed = write_recipe(tmp_path, "killed", scratch_recipe(kill_out, max_steps=STEPS, save_steps=5, save_total_limit=2))

    proc = run_cli("train", str(ref))
    assert proc.returncode == 0, proc.stderr[-3000:]

    victim = subprocess.Popen([sys.executable, "-m", "hf_vram", "train", str(killed)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        done = [s for s, _, ok in checkpoints(kill_out) if ok]
        if done and max(done) >= 10:
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (kill_out / "train_summary.json").exists()
    last = latest_complete(kill_out)
    assert last is not None and int(last.name.split("-")[1]) < STEPS

    # Simulate a kill in the middle of the next save: a newer checkpoint with a truncated weight file and no marker.
    torn = kill_out / f"checkpoint-{int(last.name.split('-')[1]) + 5}"
    if torn.exists():
        shutil.rmtree(torn)
    shutil.copytree(last, torn)
    (torn / COMPLETE_MARKER).unlink()
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    proc = run_cli("train", str(killed))
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, reference = _summary(kill_out), _summary(ref_out)
    assert resumed["resumed_from"] == str(last)
    assert resumed["global_step"] == reference["global_step"] == STEPS
    assert resumed["final_loss"] == pytest.approx(reference["final_loss"], abs=1e-4)
    assert resumed["rank_checksums"] == reference["rank_checksums"]
    # Only complete checkpoints remain, at most save_total_limit of them.
    remaining = checkpoints(kill_out)
    assert remaining and all(ok for _, _, ok in remaining) and len(remaining) <= 2


def test_latest_complete_skips_unmarked_checkpoints(tmp_path):
    for step, marked in ((5, True), (10, True), (15, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if marked:
            (d / COMPLETE_MARKER).write_text("{}")
    assert latest_complete(tmp_path) == tmp_path / "checkpoint-10"


def test_non_finite_loss_stops_the_run_naming_the_step(tmp_path):
    out = tmp_path / "out"
    # An absurd learning rate overflows the weights after the first update: the next loss is not finite.
    recipe = write_recipe(tmp_path, "nan", scratch_recipe(out, max_steps=10, lr=1e30, max_grad_norm=0))
    proc = run_cli("train", str(recipe))
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "hf-vram: training stopped: loss is" in proc.stderr
    match = re.search(r"loss is (nan|inf|-inf) at step (\d+);", proc.stderr)
    assert match and 2 <= int(match.group(2)) <= 3, proc.stderr[-2000:]  # the first update blows up the weights
    assert "lower train.lr" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "train_summary.json").exists()
