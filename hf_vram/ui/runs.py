"""The UI's runs: `hf-vram train` started as a process of its own (its own session, so it goes on when the page or
the UI is closed), and everything about a run read back from its output directory, so a restarted UI finds it
again. OUTPUT_DIR/ui-run.json names the process and the command; the log goes to OUTPUT_DIR/ui-run.log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from data_prep.atomic import atomic_write_json
from hf_vram.errors import UserError
from hf_vram.output.loss_plot import Curves, curves_from_loss_history, curves_from_trainer_log, render_loss_png
from hf_vram.output.progress import LOG_LINES, read_progress
from hf_vram.output.stop import request_stop

RUN_FILE = "ui-run.json"
RUN_LOG = "ui-run.log"


@dataclass
class RunInfo:
    name: str
    output_dir: Path
    status: str  # running, finished, stopped, failed, not started
    step: int | None
    max_steps: int | None
    eta_seconds: float | None

    def row(self) -> list:
        eta = f"{self.eta_seconds:.0f} s" if self.status == "running" and self.eta_seconds is not None else ""
        steps = f"{self.step}/{self.max_steps}" if self.step is not None else ""
        return [self.name, self.status, steps, eta, str(self.output_dir)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    # A finished child not yet reaped by its parent (this UI) is a zombie: not running.
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # not our child (started by a UI before this one): it is alive
        return True


def run_status(out: Path) -> str:
    if (out / "train_summary.json").is_file():
        return "finished"
    meta = _run_meta(out)
    if meta and _alive(meta["pid"]):
        return "running"
    if any(out.glob("checkpoint-*")):
        return "stopped"
    return "failed" if meta else "not started"


def _run_meta(out: Path) -> dict | None:
    try:
        return json.loads((out / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def list_runs(outputs: Path) -> list[RunInfo]:
    """Every output directory under outputs that holds a recipe (what a run writes first), newest first."""
    runs = []
    for out in sorted(Path(outputs).glob("*/"), key=lambda p: p.stat().st_mtime, reverse=True):
        if not (out / "recipe.yaml").is_file() and not (out / RUN_FILE).is_file():
            continue
        progress = read_progress(out) or {}
        runs.append(RunInfo(out.name, out, run_status(out), progress.get("step"), progress.get("max_steps"),
                            progress.get("eta_seconds")))
    return runs


def start_run(recipe_file: Path, output_dir: Path, cwd: Path) -> int:
    """`hf-vram train RECIPE train.output_dir=OUTPUT_DIR` in a session of its own; returns its pid. A run already
    going in that directory is refused."""
    output_dir = Path(output_dir).resolve()
    if run_status(output_dir) == "running":
        raise UserError(f"{output_dir} is already training (pid {_run_meta(output_dir)['pid']}); stop it first")
    output_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "hf_vram", "train", str(Path(recipe_file).resolve()),
               f"train.output_dir={output_dir}"]
    with open(output_dir / RUN_LOG, "ab") as log:
        proc = subprocess.Popen(command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    atomic_write_json(output_dir / RUN_FILE, {"pid": proc.pid, "command": command, "cwd": str(cwd)})
    return proc.pid


def resume_run(output_dir: Path) -> int:
    """The run's own command again: it resumes from its last complete checkpoint."""
    meta = _run_meta(Path(output_dir))
    if meta is None:
        raise UserError(f"{output_dir}: no run started from the UI here ({RUN_FILE} missing); start it from a recipe")
    return start_run(Path(meta["command"][4]), Path(output_dir), Path(meta["cwd"]))


def stop_run(output_dir: Path) -> None:
    """Ask the run to stop after its current step, with a checkpoint (hf_vram/output/stop.py)."""
    if run_status(Path(output_dir)) != "running":
        raise UserError(f"{output_dir} is not training")
    request_stop(Path(output_dir))


def log_tail(output_dir: Path, lines: int = 40) -> str:
    path = Path(output_dir) / RUN_LOG
    if not path.is_file():
        return ""
    text = path.read_bytes()[-20000:].decode("utf-8", "replace")
    # Progress bars rewrite their line with carriage returns: keep the last state of each line.
    # (str.splitlines would split at the carriage returns too.)
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.rstrip("\n").split("\n")[-lines:])


def run_curves(output_dir: Path) -> Curves:
    """The curves so far: a Trainer run's log lines, or a diffusion loop's loss history."""
    out = Path(output_dir)
    if (out / LOG_LINES).is_file():
        lines = [json.loads(x) for x in (out / LOG_LINES).read_text().splitlines() if x.strip()]
        return curves_from_trainer_log(lines)
    if (out / "loss_history.jsonl").is_file():
        return curves_from_loss_history(out / "loss_history.jsonl")
    return Curves()


def loss_picture(output_dir: Path, into: Path) -> Path | None:
    """The run's loss picture drawn now into the folder `into` (a new name each time, so the page shows the new one)."""
    curves = run_curves(output_dir)
    if not curves.train:
        return None
    into.mkdir(parents=True, exist_ok=True)
    path = into / f"loss-{Path(output_dir).name}-{len(curves.train)}.png"
    path.write_bytes(render_loss_png(curves, Path(output_dir).name))
    return path


def memory_line(output_dir: Path) -> str:
    """The run's memory at its last step, from OUTPUT_DIR/memory.jsonl (hf_vram/output/memory.py): the card's
    reserved and peak memory on a GPU, the process's resident memory on the CPU."""
    path = Path(output_dir) / "memory.jsonl"
    if not path.is_file():
        return ""
    lines = path.read_bytes()[-4000:].decode("utf-8", "replace").splitlines()
    try:
        last = json.loads(lines[-1])
    except (IndexError, ValueError):
        return ""  # the line being written
    gib = 2**30
    if "cuda_reserved_bytes" in last:
        return (f"GPU memory at step {last['step']}: {last['cuda_reserved_bytes'] / gib:.2f} GiB reserved, peak "
                f"{last['cuda_max_reserved_bytes'] / gib:.2f} GiB")
    return f"memory at step {last['step']}: {last['cpu_rss_bytes'] / gib:.2f} GiB resident (CPU run)"


def sample_grids(output_dir: Path) -> list[str]:
    """A diffusion run's sample grids (OUTPUT_DIR/samples/*.png), oldest first."""
    return [str(p) for p in sorted((Path(output_dir) / "samples").glob("*.png"))]
