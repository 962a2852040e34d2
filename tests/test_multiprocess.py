"""`hf-vram train --nproc 2` forms one gloo DDP group on CPU, and the ranks end with identical weights."""

from __future__ import annotations

import json

from .conftest import run_cli, scratch_recipe, write_recipe


def test_two_processes_form_one_ddp_group(tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, "ddp", scratch_recipe(out, max_steps=8, micro_batch_size=4))
    proc = run_cli("train", str(recipe), "--nproc", "2", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed_backend"] == "gloo"
    checksums = summary["rank_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1], "DDP kept the ranks' weights identical"
    assert summary["final_loss"] < summary["first_loss"]
    assert "2 process(es)" in proc.stdout
