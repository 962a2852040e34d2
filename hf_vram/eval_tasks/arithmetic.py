"""The hooks of arithmetic.yaml: its records (builtin:arithmetic's held-out split) and its exact match."""

from __future__ import annotations

from data_prep.builtin import BUILTIN_SOURCES
from hf_vram.evaluate import prompt_of


def held_out_split(template: str = "alpaca", samples: int = 0, **metadata):
    """lm-eval's custom_dataset hook, called with the task's metadata: the held-out questions as
    ArithmeticTask.score takes them (the first `samples`; all when 0), each with its prompt in `template`."""
    import datasets

    records = BUILTIN_SOURCES["arithmetic"].records("alpaca", "test")
    records = records[: int(samples)] if int(samples) > 0 else records
    prompt = prompt_of(template)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([{**r, "prompt": prompt(r)} for r in records])})


def first_line(generated: str) -> str:
    """The answer in a completion, read as data_prep.builtin.ArithmeticTask.score reads it (its comparison is inline
    there; tests/test_eval_harness.py checks that both agree)."""
    return generated.strip().split("\n")[0].strip()


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(first_line(results[0]) == doc["output"])}
