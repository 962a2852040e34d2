"""`hf-vram table`: predicted memory, fit and time of every shipped recipe on a card, each by its task's planner."""

from __future__ import annotations

from hf_vram.recipe.load import load_recipe, shipped_recipes
from hf_vram.tasks import task_of
from hf_vram.vram.gpus import GPU


def table_rows(gpu: GPU) -> list[dict]:
    """One row per shipped recipe: kind, parameters, predicted peak, whether it fits (and how, fitted), time."""
    return table_plans(gpu)[0]


def table_plans(gpu: GPU) -> tuple[list[dict], list[tuple[str, object]]]:
    """table_rows, and the (name, plan) of each recipe that trains on the GPU (the table's picture)."""
    rows, plans = [], []
    for name, path in shipped_recipes().items():
        loaded = load_recipe(str(path))
        planner = task_of(loaded.recipe).make_planner()
        if planner is None:
            rows.append({"recipe": name, **_untrained_row(loaded)})
            continue
        plan = planner.plan(loaded, gpu)
        plans.append((name, plan))
        rows.append({"recipe": name, **planner.table_row(loaded, gpu, plan)})
    return rows, plans


def _untrained_row(loaded) -> dict:
    """A task that trains nothing on the GPU (assemble: the experts are copied into one model on the CPU; its
    fine-tune has its own row)."""
    from hf_vram.vram.configs import resolve_config
    from hf_vram.vram.counts import count_parameters

    r = loaded.recipe
    return {"kind": r.task, "parameters": count_parameters(resolve_config(loaded), r).total,
            "predicted_peak_gib": "-", "fits": "-", "predicted_hours": None, "longest_context": "-"}


def format_table(rows: list[dict], gpu: GPU) -> tuple[str, str]:
    """(markdown, csv) of table_rows."""
    import csv
    import io

    cols = list(rows[0])
    md = [f"Shipped recipes on {gpu.name} (predicted by `hf-vram plan`)", "", "| " + " | ".join(cols) + " |",
          "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols) + " |" for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)
    return "\n".join(md), buf.getvalue()
