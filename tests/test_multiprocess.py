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


def _finite_on_rank(rank: int, init_file: str, results) -> None:
    import torch
    import torch.distributed as dist

    from hf_vram.errors import TrainingStopped
    from hf_vram.output.finite import FiniteLossWatch

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        watch = FiniteLossWatch("out")
        # Rank 1 alone sees an inf loss (as data only one rank reads could give): both ranks must stop.
        watch.record(torch.tensor(float("inf") if rank == 1 else 1.0), step=3)
        results[rank] = "ran on"
    except TrainingStopped as e:
        results[rank] = str(e)
    finally:
        dist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """The non-finite check agrees across processes (an all-reduce of the flag), so no rank is left waiting in a
    collective for ranks that stopped."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_finite_on_rank, args=(str(tmp_path / "init"), results), nprocs=2, start_method="spawn")
        results = dict(results)
    assert set(results) == {0, 1}
    assert all("at step 3" in results[r] and "lower train.lr" in results[r] for r in (0, 1)), results
    assert results[1].startswith("loss is inf") and results[0].startswith("the loss of another process"), results
