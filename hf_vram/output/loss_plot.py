"""OUTPUT_DIR/loss.png, the picture of a run: the training loss (raw, and smoothed), the held-out loss, the learning
rate on a second axis, and below them the curves of the task's own metrics (DPO/ORPO/SimPO/KTO reward margins, KTO's
KL estimate, GRPO's rewards). Written at each checkpoint and at the end, by the Trainer's callback below or by the
diffusion loop from its loss_history.jsonl; matplotlib's headless Agg backend, so no display is needed.

Written whole (to a temporary file, then renamed), so a reader (the UI, a browser) never sees half a PNG."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from data_prep.atomic import atomic_write_bytes

LOSS_PNG = "loss.png"
# Trainer log keys of the task metrics drawn below the loss, with their labels.
TASK_CURVES = {
    "rewards/margins": "reward margin",
    "kl": "KL estimate",
    "reward": "mean reward",
}
# Debiased exponential moving average, as TensorBoard's smoothing slider draws it.
SMOOTHING = 0.8


@dataclass
class Curves:
    """(step, value) points of one run."""

    train: list[tuple[int, float]] = field(default_factory=list)
    held_out: list[tuple[int, float]] = field(default_factory=list)
    lr: list[tuple[int, float]] = field(default_factory=list)
    task: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def curves_from_trainer_log(log_history: list[dict]) -> Curves:
    """The curves in a Trainer's state.log_history (what trainer_state.json holds)."""
    c = Curves()
    for e in log_history:
        step = e.get("step")
        if step is None:
            continue
        if "loss" in e:
            c.train.append((step, float(e["loss"])))
        if "eval_loss" in e:
            c.held_out.append((step, float(e["eval_loss"])))
        if "learning_rate" in e:
            c.lr.append((step, float(e["learning_rate"])))
        for key, value in e.items():
            label = TASK_CURVES.get(key) or (key.split("/")[1] if key.startswith("rewards/") and key.endswith("/mean")
                                             and key.count("/") == 2 else None)
            if label is not None and isinstance(value, (int, float)):
                c.task.setdefault(label, []).append((step, float(value)))
    return c


def curves_from_steps(lines: list[dict]) -> Curves:
    """The curves of a loop's {"step", "loss", "lr"} lines (hf_vram/output/loss_history.py)."""
    c = Curves()
    for e in lines:
        c.train.append((e["step"], float(e["loss"])))
        if "lr" in e:
            c.lr.append((e["step"], float(e["lr"])))
    return c


def curves_from_loss_history(path: Path) -> Curves:
    """The curves in a diffusion run's loss_history.jsonl (one line per optimizer step)."""
    return curves_from_steps([json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()])


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def render_loss_png(curves: Curves, title: str) -> bytes:
    """The PNG bytes of the picture."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = 2 if curves.task else 1
    fig = Figure(figsize=(8, 3.2 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    if curves.train:
        steps, values = zip(*curves.train)
        ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=1, label="training loss")
        ax.plot(steps, smoothed(list(values)), color="tab:blue", linewidth=2, label="training loss (smoothed)")
    if curves.held_out:
        steps, values = zip(*curves.held_out)
        ax.plot(steps, values, "o-", color="tab:orange", linewidth=2, label="held-out loss")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if curves.lr:
        lr_ax = ax.twinx()
        steps, values = zip(*curves.lr)
        lr_ax.plot(steps, values, color="tab:gray", linestyle="--", linewidth=1, label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        more = lr_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:
        ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.set_title(title)
    if curves.task:
        for label, points in curves.task.items():
            steps, values = zip(*points)
            axes[1].plot(steps, values, "-", linewidth=2, label=label)
        axes[1].set_ylabel("task metrics")
        axes[1].grid(alpha=0.3)
        axes[1].legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("optimizer step")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def write_loss_png(output_dir: Path, curves: Curves, title: str) -> Path | None:
    """OUTPUT_DIR/loss.png of the curves; None (nothing written) before the first logged loss."""
    if not curves.train and not curves.task:
        return None
    path = Path(output_dir) / LOSS_PNG
    atomic_write_bytes(path, render_loss_png(curves, title))
    return path


class LossPicture(TrainerCallback):
    """loss.png after every checkpoint (once it is saved) and at the end of training, on the main process."""

    def __init__(self, title: str):
        self.title = title

    def _draw(self, args, state) -> None:
        if state.is_world_process_zero:
            write_loss_png(Path(args.output_dir), curves_from_trainer_log(state.log_history), self.title)

    def on_save(self, args, state, control, **kwargs):
        self._draw(args, state)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._draw(args, state)
        return control
