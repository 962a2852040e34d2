"""lm-eval's simple_evaluate on a model in memory (lm_eval.models.huggingface.HFLM wraps the instance), and its
results read back as scores: for the console, train_summary.json and the model card.

hf-vram's own tasks and lm-eval's run as two evaluations, each with its own HFLM: hf-vram's score tokenizes its
prompts without special tokens (hf_vram/generate.py, greedy_generate), so its tasks do too (add_bos_token=False),
while lm-eval's tasks keep lm-eval's default (the tokenizer's own, BOS for Llama-style tokenizers), so that their
numbers compare with everyone else's."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

from hf_vram.benchmarks.tasks import (
    PromptSettings,
    lm_eval_manager,
    load_ours,
    load_theirs,
    project_manager,
    project_task_names,
    quiet_known_noise,
    select,
)
from hf_vram.output.summary import score_metrics, score_stderr

# greedy_generate's batch: one batch of the same prompts pads them alike, so hf-vram's task gives the very numbers
# of hf-vram's own score.
DEFAULT_BATCH_SIZE = 32


class Benchmarks:
    """Named tasks, checked and their data fetched on construction (before any model loads or trains); run() then
    evaluates any number of models."""

    def __init__(self, names: list[str], settings: PromptSettings, where: str):
        self.selection = select(names, where)
        self.settings = settings
        if self.selection.theirs:
            load_theirs(self.selection.theirs, where)  # downloaded now, read from the datasets cache by run()

    def run(self, model, tokenizer, limit: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
            log_samples: bool = False) -> list[dict]:
        """lm-eval's results (one dict per evaluation; with log_samples, each answer under "samples"), the model left
        in the mode it was in and the random state as it was (lm-eval seeds python, numpy and torch; a training
        that follows must not see that)."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        quiet_known_noise()
        runs = []
        with _state_kept(model):  # from before HFLM, which switches the model to eval mode
            if self.selection.ours:
                tasks = load_ours(self.selection.ours, self.settings, tokenizer.eos_token_id)
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=False)
                runs.append((lm, tasks, project_manager()))
            if self.selection.theirs:
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
                runs.append((lm, list(self.selection.theirs), lm_eval_manager()))
            return [simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=log_samples)
                    for lm, tasks, manager in runs]


def evaluate_output(out: Path, names: list[str], limit: int | None = None,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> list[dict]:
    """`hf-vram eval`: lm-eval's results on an output directory. The output and the task names are checked, and
    lm-eval's data fetched, before the model loads."""
    from hf_vram.benchmarks.output_model import load_output, read_output

    loaded = read_output(out)
    benchmarks = Benchmarks(names, PromptSettings.of(loaded.recipe), "--tasks")
    _, model, tokenizer = load_output(out, loaded)
    return benchmarks.run(model, tokenizer, limit, batch_size)


@contextlib.contextmanager
def _state_kept(model):
    """HFLM puts the model in eval mode and simple_evaluate seeds the global generators: both are put back."""
    import numpy as np
    import torch

    training, py_state, np_state = model.training, random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        model.train(training)


def scores(results: list[dict]) -> dict[str, dict]:
    """task -> {metric: value, metric_stderr: value, samples, dataset, split} from lm-eval's results. A metric
    read through a filter other than lm-eval's "none" keeps it, as lm-eval writes it (exact_match,strict-match)."""
    out: dict[str, dict] = {}
    for result in results:
        for task, values in result["results"].items():
            entry: dict = {}
            for key, value in values.items():
                metric, _, where = key.partition(",")
                if where and isinstance(value, int | float) and not isinstance(value, bool):
                    entry[metric if where == "none" else key] = value  # stderr "N/A" (not computed) is left out
            config = result.get("configs", {}).get(task, {})
            facts = {"samples": result.get("n-samples", {}).get(task, {}).get("effective"),
                     "dataset": config.get("dataset_path"),
                     "split": config.get("test_split") or config.get("validation_split")}
            out[task] = entry | {k: v for k, v in facts.items() if v is not None}
    return out


def score_lines(task_scores: dict[str, dict]) -> list[str]:
    """One line per task; an exact match in the words of hf-vram's own score ("90.0% exact match (18/20 held-out)")."""
    lines = []
    for task, entry in task_scores.items():
        n = entry.get("samples")
        metrics = score_metrics(entry)
        parts = [_metric_text(task, m, entry) for m in metrics]
        counted = "exact_match" in metrics and n
        lines.append(f"{task}: {', '.join(parts)}" + ("" if counted or not n else f" ({n} samples)"))
    return lines


def _metric_text(task: str, metric: str, entry: dict) -> str:
    value, n = entry[metric], entry.get("samples")
    if metric == "exact_match" and n:
        return f"{value:.1%} exact match ({round(value * n)}/{n}{' held-out' if task in project_task_names() else ''})"
    stderr = score_stderr(entry, metric)
    return f"{metric} {value:.4g}" + (f" ± {stderr:.2g}" if stderr is not None else "")


def tables(results: list[dict]) -> str:
    """lm-eval's own result tables (markdown), as its CLI prints them."""
    from lm_eval.utils import make_table

    text = []
    for result in results:
        text.append(make_table(result))
        if result.get("groups"):
            text.append(make_table(result, "groups"))
    return "\n".join(text)
