"""`hf-vram plan --png` and `hf-vram table --png`: the plan as stacked bars, one per card or recipe, each with the
card's capacity and the predicted peak marked."""

from __future__ import annotations

from collections import defaultdict

import pytest
from PIL import Image

from hf_vram.cli import main
from hf_vram.recipe.load import load_recipe
from hf_vram.vram.estimate import GiB
from hf_vram.vram.gpus import get_gpu
from hf_vram.vram.plan import plan_recipe
from hf_vram.vram.plan_plot import plan_figure

CARDS = ["rtx3060", "rtx4070", "rtx4090"]


def _bars(fig) -> dict[float, list[float]]:
    """Heights of the stacked rectangles at each x position of a figure with vertical bars."""
    stacks = defaultdict(list)
    for patch in fig.axes[0].patches:
        stacks[round(patch.get_x() + patch.get_width() / 2, 3)].append(patch.get_height())
    return dict(stacks)


def test_one_stacked_bar_per_card_with_its_capacity_and_the_peak():
    loaded = load_recipe("llama7b-qlora-alpaca")
    plans = [(get_gpu(c).name, plan_recipe(loaded, get_gpu(c))) for c in CARDS]
    fig = plan_figure(plans, "t")
    bars = _bars(fig)
    assert sorted(bars) == [0, 1, 2]
    for i, (_, plan) in enumerate(plans):
        assert len(bars[i]) == len(plan.items)  # one segment per item, in GiB
        assert sum(bars[i]) == pytest.approx(sum(item.bytes for item in plan.items) / GiB)
    # Two marks per bar: the capacity (12, 12, 24 GiB) and the predicted peak.
    lines = [seg for coll in fig.axes[0].collections for seg in coll.get_segments()]
    heights = sorted({round(seg[0][1], 3) for seg in lines})
    assert heights == sorted({12.0, 24.0, round(plans[0][1].total / GiB, 3)})
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["RTX 3060 12 GB", "RTX 4070 12 GB", "RTX 4090 24 GB"]


def test_plan_cli_draws_three_bars_and_refuses_a_missing_folder(tmp_path, capsys):
    png = tmp_path / "plan.png"
    args = ["plan", "llama7b-qlora-alpaca", "--png", str(png)] + [x for c in CARDS for x in ("--gpu", c)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("plan: llama7b-qlora-alpaca on") == 3 and f"plan picture: {png}" in out
    image = Image.open(png)
    assert image.format == "PNG" and image.width > 500
    assert main(["plan", "llama7b-qlora-alpaca", "--png", str(tmp_path / "no" / "plan.png")]) == 2
    captured = capsys.readouterr()
    assert "folder" in captured.err and "does not exist" in captured.err and "plan:" not in captured.out


def test_table_cli_draws_every_planned_recipe(tmp_path, capsys):
    png = tmp_path / "table.png"
    assert main(["table", "--png", str(png)]) == 0
    assert f"plan picture: {png}" in capsys.readouterr().out
    image = Image.open(png)
    assert image.format == "PNG" and image.height > image.width  # one row per recipe
