"""The plan as a picture (`hf-vram plan --png`, `hf-vram table --png`, the UI's plan view): one stacked bar per plan
of its items (weights, adapter, gradients, optimizer states, activations, logits, generation, the CUDA context),
the predicted peak marked on it, and the card's capacity as a line across it. The items are not all alive at once
(the peak comes at the start or the end of backward), so a bar can stand above its peak mark: the mark is what the
card must hold. matplotlib's headless Agg backend; the PNG is written whole."""

from __future__ import annotations

import io
from pathlib import Path

from data_prep.atomic import atomic_write_bytes
from hf_vram.vram.estimate import GiB, Plan

# One colour per item, the same in every picture; items of other names (a planner's own) take the next free colour.
ITEM_COLOURS = {
    "weights": "#4c72b0",
    "adapter": "#55a868",
    "gradients": "#c44e52",
    "optimizer states": "#8172b2",
    "activations": "#ccb974",
    "logits and loss": "#64b5cd",
    "generation": "#e17c05",
    "autocast weight copies": "#937860",
    "CUDA context + allocator": "#8c8c8c",
}
SPARE_COLOURS = ("#da8bc3", "#a6d854", "#ffd92f", "#b3b3b3", "#1b9e77", "#7570b3")


def _colours(plans: list[Plan]) -> dict[str, str]:
    names = list(dict.fromkeys(i.name for p in plans for i in p.items))
    spare = iter(SPARE_COLOURS * 4)
    return {n: ITEM_COLOURS.get(n) or next(spare) for n in names}


def render_plan_png(bars: list[tuple[str, Plan]], title: str) -> bytes:
    buffer = io.BytesIO()
    plan_figure(bars, title).savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def plan_figure(bars: list[tuple[str, Plan]], title: str):
    """The matplotlib Figure: bars of (label, plan), side by side (vertical bars) or, for more than 8, one per row."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    plans = [p for _, p in bars]
    colours = _colours(plans)
    across = len(bars) <= 8
    size = (max(5.0, 1.6 * len(bars) + 3), 5.5) if across else (10, 0.32 * len(bars) + 1.8)
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    seen: set[str] = set()
    for i, (_, plan) in enumerate(bars):
        bottom = 0.0
        for item in plan.items:
            gib = item.bytes / GiB
            label = item.name if item.name not in seen else None
            seen.add(item.name)
            if across:
                ax.bar(i, gib, bottom=bottom, width=0.6, color=colours[item.name], label=label)
            else:
                ax.barh(i, gib, left=bottom, height=0.7, color=colours[item.name], label=label)
            bottom += gib
        _marks(ax, i, plan, bottom, across, first=i == 0)
    top = max(max(p.usable, p.total, sum(i.bytes for i in p.items)) for p in plans) / GiB * 1.12
    (ax.set_ylim if across else ax.set_xlim)(0, top)
    labels = [label for label, _ in bars]
    if across:
        ax.set_xticks(range(len(bars)), labels, fontsize=9)
        ax.set_ylabel("GiB")
    else:
        ax.set_yticks(range(len(bars)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("GiB")
    ax.grid(axis="y" if across else "x", alpha=0.3)
    ax.set_title(title, fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def _marks(ax, i: int, plan: Plan, bar_top: float, across: bool, first: bool) -> None:
    """The card's capacity (red dashes) and the predicted peak (black) across bar i, the peak's figure above the
    bar."""
    capacity, peak = plan.usable / GiB, plan.total / GiB
    verdict = "fits" if plan.fits else "does not fit"
    line = ax.hlines if across else ax.vlines
    line(capacity, i - 0.4, i + 0.4, colors="red", linestyles="--", linewidth=2,
         label="card capacity" if first else None)
    line(peak, i - 0.35, i + 0.35, colors="black", linewidth=2.5, label="predicted peak" if first else None)
    text = f"{peak:.1f} GiB\n{verdict}" if across else f" {peak:.1f} GiB, {verdict}"
    if across:
        ax.annotate(text, (i, max(peak, bar_top)), xytext=(0, 4), textcoords="offset points", ha="center",
                    fontsize=8)
    else:
        ax.annotate(text, (max(peak, bar_top), i), va="center", fontsize=7)


def png_target(path: str | Path) -> Path:
    """--png FILE checked before anything is planned: its folder must exist."""
    path = Path(path)
    if not path.parent.is_dir():
        from hf_vram.errors import UserError

        raise UserError(f"--png {path}: folder {path.parent} does not exist; create it or name another file")
    return path


def write_plan_png(path: str | Path, bars: list[tuple[str, Plan]], title: str) -> Path:
    path = png_target(path)
    atomic_write_bytes(path, render_plan_png(bars, title))
    return path
