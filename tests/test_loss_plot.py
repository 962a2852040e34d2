"""OUTPUT_DIR/loss.png: every run draws its curves at each checkpoint and at the end (Trainer runs through a
callback, the diffusion loop from its loss history), with the task's own metrics in a second panel."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from transformers import TrainerCallback

from hf_vram.output.loss_plot import LOSS_PNG, Curves, curves_from_trainer_log, render_loss_png, smoothed
from hf_vram.recipe.load import load_recipe
from hf_vram.runners.run import finish, setup

from .conftest import StopAt, write_recipe

PNG = b"\x89PNG\r\n\x1a\n"


def test_curves_are_read_from_a_trainer_log_and_drawn():
    history = [
        {"loss": 2.0, "learning_rate": 1e-3, "rewards/margins": 0.0, "step": 1},
        {"loss": 1.5, "learning_rate": 9e-4, "rewards/margins": 0.2, "reward": 0.4, "rewards/exact_number/mean": 0.3,
         "step": 2},
        {"eval_loss": 1.7, "eval_rewards/margins": 0.1, "step": 2},
        {"train_runtime": 3.0, "step": 2},  # the end-of-training entry: no curve
    ]
    c = curves_from_trainer_log(history)
    assert c.train == [(1, 2.0), (2, 1.5)] and c.held_out == [(2, 1.7)] and c.lr == [(1, 1e-3), (2, 9e-4)]
    assert c.task == {"reward margin": [(1, 0.0), (2, 0.2)], "mean reward": [(2, 0.4)], "exact_number": [(2, 0.3)]}
    with_task, plain = render_loss_png(c, "t"), render_loss_png(Curves(train=c.train), "t")
    assert with_task.startswith(PNG) and plain.startswith(PNG)
    # The task panel makes the picture taller.
    import io

    assert Image.open(io.BytesIO(with_task)).height > Image.open(io.BytesIO(plain)).height


def test_smoothing_is_debiased():
    assert smoothed([4.0]) == [4.0]  # the first point is itself, not pulled towards 0
    assert smoothed([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    s = smoothed([1.0] * 10 + [0.0] * 10)
    assert s[9] == pytest.approx(1.0) and 0.0 < s[-1] < 0.2
    assert all(b < a for a, b in zip(s[10:], s[11:]))  # falls at every step after the drop


def _sft_recipe(base, out, **train):
    return {
        "model": {"name_or_path": str(base)},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"source": "builtin:arithmetic", "format": "alpaca", "template": "alpaca-short", "max_length": 64},
        "train": {"output_dir": str(out), "micro_batch_size": 8, "max_steps": 6, "lr": 5e-3, "warmup": 0,
                  "logging_steps": 1, "save_steps": 3, "report_to": [], **train},
    }


def test_a_run_draws_loss_png_at_its_checkpoint_and_at_the_end(tmp_path, tiny_base):
    out = tmp_path / "out"
    path = write_recipe(tmp_path, "sft", _sft_recipe(tiny_base, out))
    run = setup(load_recipe(str(path)))
    seen = []

    class Probe(TrainerCallback):  # runs after hf-vram's callbacks: what is on disk once checkpoint-3 is saved
        def on_save(self, args, state, control, **kwargs):
            seen.append((state.global_step, (out / LOSS_PNG).is_file()))

    run.trainer.add_callback(Probe())
    run.trainer.add_callback(StopAt(3))  # as a kill after checkpoint-3 would leave it
    finish(run)
    assert (out / "checkpoint-3").is_dir() and seen[0] == (3, True), seen
    first = Image.open(out / LOSS_PNG)
    assert first.format == "PNG" and first.width >= 600
    (out / "train_summary.json").unlink()  # an interrupted run has no summary: the next one resumes
    before = (out / LOSS_PNG).read_bytes()
    run = setup(load_recipe(str(path)))
    finish(run)
    assert (out / LOSS_PNG).read_bytes() != before  # redrawn with the steps after the checkpoint
    assert [s for s, _ in curves_from_trainer_log(run.trainer.state.log_history).train] == [1, 2, 3, 4, 5, 6]
    assert not list(out.glob(".loss.png.tmp-*"))  # written whole, through a temporary file


def test_the_diffusion_loop_draws_loss_png_from_its_history(tmp_path):
    from hf_vram.runners.run import train

    from .test_diffusion import unet_recipe

    out = tmp_path / "out"
    recipe = unet_recipe(out, max_steps=6, lr=1e-3, logging_steps=2)
    recipe["train"]["save_steps"] = 3
    train(load_recipe(str(write_recipe(tmp_path, "unet", recipe))))
    lines = [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == [1, 2, 3, 4, 5, 6] and lines[0]["lr"] > lines[-1]["lr"] >= 0  # cosine decay
    assert Image.open(out / LOSS_PNG).format == "PNG"
