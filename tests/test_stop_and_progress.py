"""A run stopped on request (OUTPUT_DIR/STOP, the UI's stop button) saves a checkpoint, ends without a summary and
resumes from there; progress.json and log_history.jsonl follow a run from outside."""

from __future__ import annotations

import json

import pytest
from transformers import TrainerCallback

from hf_vram.errors import TrainingStopped
from hf_vram.output.progress import LOG_LINES, read_progress
from hf_vram.output.stop import STOP_FILE, request_stop
from hf_vram.recipe.load import load_recipe
from hf_vram.runners.run import finish, setup

from .conftest import write_recipe
from .test_loss_plot import _sft_recipe


def test_a_stop_request_saves_a_checkpoint_and_the_same_command_resumes(tmp_path, tiny_base):
    out = tmp_path / "out"
    path = write_recipe(tmp_path, "sft", _sft_recipe(tiny_base, out, save_steps=100))
    run = setup(load_recipe(str(path)))

    class Press(TrainerCallback):  # the button, pressed during step 2
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                request_stop(out)

    run.trainer.add_callback(Press())
    with pytest.raises(TrainingStopped, match=r"stopped on request \(OUTPUT_DIR/STOP\) after step 2: checkpoint-2 is kept"):
        finish(run)
    assert (out / "checkpoint-2").is_dir() and not (out / "train_summary.json").exists()
    assert read_progress(out)["step"] == 2 and read_progress(out)["max_steps"] == 6
    # The request is this run's only: the next one clears it, resumes from checkpoint-2 and ends.
    run = setup(load_recipe(str(path)))
    assert not (out / STOP_FILE).exists() and run.resume == out / "checkpoint-2"
    summary = finish(run)
    assert summary["global_step"] == 6 and summary["resumed_from"] == str(out / "checkpoint-2")
    progress = read_progress(out)
    assert progress["step"] == 6 and progress["eta_seconds"] == 0
    lines = [json.loads(line) for line in (out / LOG_LINES).read_text().splitlines()]
    assert [e["step"] for e in lines if "loss" in e] == [1, 2, 3, 4, 5, 6]  # the resumed run's file starts from the checkpoint's log


def test_the_diffusion_loop_stops_on_request_with_a_checkpoint_and_resumes(tmp_path):
    from .test_diffusion import unet_recipe

    out = tmp_path / "out"
    path = write_recipe(tmp_path, "unet", unet_recipe(out, max_steps=4, lr=1e-3, logging_steps=1))
    run = setup(load_recipe(str(path)))
    request_stop(out)  # pressed before the first step ends
    with pytest.raises(TrainingStopped, match=r"after step 1: checkpoint-1 is kept"):
        finish(run)
    assert (out / "checkpoint-1").is_dir() and not (out / "train_summary.json").exists()
    run = setup(load_recipe(str(path)))
    assert not (out / STOP_FILE).exists()
    summary = finish(run)
    assert summary["global_step"] == 4 and summary["resumed_from"].endswith("checkpoint-1")
