"""The UI's work without a browser: a run's state read from its output folder, the plan view's controls as
overrides, recipes checked with the CLI's messages and saved as new files, the --fit changes written into the
text, and errors shown instead of raised."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from hf_vram.errors import RecipeError, UserError
from hf_vram.ui import recipes, runs
from hf_vram.ui.app import App


def test_a_runs_state_is_read_from_its_output_folder(tmp_path):
    out = tmp_path / "outputs" / "r"
    out.mkdir(parents=True)
    (out / "recipe.yaml").write_text("task: sft\n")
    assert runs.run_status(out) == "not started"
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    (out / runs.RUN_FILE).write_text(json.dumps({"pid": done.pid, "command": [], "cwd": str(tmp_path)}))
    assert runs.run_status(out) == "failed"  # its process ended with nothing saved
    (out / "checkpoint-3").mkdir()
    assert runs.run_status(out) == "stopped"
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (out / runs.RUN_FILE).write_text(json.dumps({"pid": alive.pid, "command": [], "cwd": str(tmp_path)}))
        assert runs.run_status(out) == "running"
        with pytest.raises(UserError, match="already training"):
            runs.start_run(tmp_path / "x.yaml", out, tmp_path)
        runs.stop_run(out)
        assert (out / "STOP").is_file()
    finally:
        alive.kill()
        alive.wait()
    (out / "train_summary.json").write_text("{}")
    assert runs.run_status(out) == "finished"
    (out / "progress.json").write_text(json.dumps({"step": 4, "max_steps": 8, "eta_seconds": 3.0}))
    (info,) = runs.list_runs(tmp_path / "outputs")
    assert info.row() == ["r", "finished", "4/8", "", str(out)]


def test_log_tail_keeps_the_last_state_of_progress_bars_and_memory_is_read(tmp_path):
    (tmp_path / runs.RUN_LOG).write_bytes(b"start\n 10%|# | 1/10\r 20%|## | 2/10\r 30%|### | 3/10\ndone\n")
    assert runs.log_tail(tmp_path) == "start\n 30%|### | 3/10\ndone"
    (tmp_path / "memory.jsonl").write_text(json.dumps({"step": 7, "cpu_rss_bytes": 3 * 2**29}) + "\n")
    assert runs.memory_line(tmp_path) == "memory at step 7: 1.50 GiB resident (CPU run)"


def test_controls_become_overrides_and_auto_stays_auto():
    assert recipes.control_overrides(8, 256, True, "auto") == [
        "train.micro_batch_size=8", "data.max_length=256", "train.gradient_checkpointing=true",
        "train.activation_offloading=auto"]
    assert recipes.control_overrides(None, None, None, "off") == ["train.activation_offloading=false"]
    # 0 is passed on, to be refused by the recipe's own check, not read as "unset".
    assert recipes.control_overrides(0, None, None, None) == ["train.micro_batch_size=0"]


def test_recipes_are_checked_like_the_cli_and_saved_as_new_files(tmp_path):
    app = App(tmp_path)
    text, name, micro, length, ckpt, offload, said = app.pick("demo")
    assert name == "demo" and micro == 16 and length == 64 and said == "Loaded `demo`."
    with pytest.raises(RecipeError, match="train.micro_bach_size"):
        recipes.check_text(tmp_path, "mine", text.replace("micro_batch_size", "micro_bach_size"))
    status, choice = app.save("mine", text)
    assert (tmp_path / "recipes" / "mine.yaml").read_text() == text and choice["value"] == "mine (yours)"
    assert "mine (yours)" in app.choices() and not list((tmp_path / "recipes").glob(".*"))
    with pytest.raises(UserError, match="give the recipe a name"):
        recipes.safe_name("  ..  ")


def test_fit_changes_are_written_into_the_text(tmp_path):
    app = App(tmp_path)
    text = "extends: demo\ntrain:\n  micro_batch_size: 4\n"
    new, said = app.apply_fit(text, "train.micro_batch_size=2 train.gradient_checkpointing=true")
    assert yaml.safe_load(new) == {"extends": "demo", "train": {"micro_batch_size": 2, "gradient_checkpointing": True}}
    assert "Applied" in said


def test_errors_are_shown_in_the_page_not_raised():
    from hf_vram.ui.layout import shown

    def broken(x):
        raise UserError("the key is wrong; did you mean 'right'?")

    def crashed(x):
        raise ZeroDivisionError("division by zero")

    out = shown(broken, 2, status_at=1)(1)
    assert out[1] == "**Error:** the key is wrong; did you mean 'right'?"
    assert shown(crashed, 1)(1) == "**Error:** ZeroDivisionError: division by zero"


def test_other_addresses_need_a_login(tmp_path):
    from hf_vram.ui.app import serve

    with pytest.raises(UserError, match="give --auth user:password"):
        serve(tmp_path, host="0.0.0.0")
    with pytest.raises(UserError, match="--auth: give it as user:password"):
        serve(tmp_path, auth="nopassword")
    assert os.environ.get("GRADIO_ANALYTICS_ENABLED", "False") == "False"
