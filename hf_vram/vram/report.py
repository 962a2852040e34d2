"""How plans are written: sizes, the item lines with the verdict, durations, and a table cell of the fit."""

from __future__ import annotations

from hf_vram.vram.estimate import GiB, Plan


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def item_lines(plan: Plan, when: str) -> list[str]:
    """One line per item, then the peak with the verdict; `when` says where in the step the peak falls."""
    width = max(len(i.name) for i in plan.items)
    lines = [f"  {i.name:<{width}}  {gib(i.bytes):>10}  {i.note}" for i in plan.items]
    spare = plan.usable - plan.total
    verdict = f"fits, {gib(spare)} to spare" if plan.fits else f"does NOT fit: {gib(-spare)} over"
    lines.append(f"  {'peak':<{width}}  {gib(plan.total):>10}  of {gib(plan.usable)}: {verdict} ({when})")
    return lines


def rough_duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def fit_cell(plan: Plan, refit) -> dict:
    """The table's columns of one plan: parameters, predicted peak, whether it fits (or with which change, from
    refit() -> (changes, plan)), predicted hours."""
    fitted = "" if plan.fits else " ".join(refit()[0]) or "no setting fits"
    return {
        "parameters": plan.params,
        "predicted_peak_gib": round(plan.total / GiB, 2),
        "fits": "yes" if plan.fits else ("with " + fitted if fitted != "no setting fits" else "no"),
        "predicted_hours": round(plan.seconds / 3600, 2) if plan.seconds else None,
    }
