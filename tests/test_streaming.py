"""data.streaming: records read as a datasets IterableDataset, checked and tokenized as training draws them, with
the same rows, masks and error messages as the cached preparation; training on a stream, and resuming one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from data_prep.errors import DataError
from data_prep.prepare import load_examples, prepare_dataset
from data_prep.streaming import tokenized_rows, tokenized_stream
from hf_vram.cli import main
from hf_vram.output.summary import SUMMARY
from hf_vram.recipe.load import load_recipe
from hf_vram.recipe.schema import DataSection
from hf_vram.runners.run import finish, setup

from .conftest import SAMPLE_DATA, StopAt, write_recipe


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def alpaca_jsonl(tmp_path):
    """The first 40 records of the Alpaca sample as JSON Lines (a format datasets streams line by line)."""
    return _jsonl(tmp_path / "alpaca.jsonl", json.loads((SAMPLE_DATA / "alpaca_en_demo.json").read_text())[:40])


@pytest.fixture
def arithmetic_jsonl(tmp_path):
    """Short Alpaca records in the tiny base's own vocabulary (trained on arithmetic): answers fit max_length."""
    from data_prep.builtin import BUILTIN_SOURCES

    return _jsonl(tmp_path / "arithmetic.jsonl", BUILTIN_SOURCES["arithmetic"].records("alpaca", "train")[:120])


def sft_recipe(base, source, out, **data):
    return {
        "model": {"name_or_path": str(base)},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"source": str(source), "format": "alpaca", "template": "alpaca-short", "max_length": 64,
                 "streaming": True, "shuffle_buffer": 16, **data},
        "train": {"output_dir": str(out), "micro_batch_size": 4, "max_steps": 6, "lr": 5e-3, "warmup": 0,
                  "logging_steps": 1, "save_steps": 100, "report_to": [], "seed": 3},
    }


@pytest.mark.parametrize("max_length", [4096, 512])  # whole samples; and some cut, some dropped
def test_streamed_rows_match_the_cached_preparation(alpaca_jsonl, tiny_base, max_length):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    keys = {"source": str(alpaca_jsonl), "format": "alpaca", "max_length": max_length}
    cached = prepare_dataset(load_examples(DataSection(**keys), 0), tok, DataSection(**keys), None).train
    streamed = list(tokenized_stream(DataSection(**keys, streaming=True, shuffle_buffer=0), tok, seed=0))
    assert len(streamed) == len(cached) >= 10
    for s, c in zip(streamed, cached):
        assert s["input_ids"] == c["input_ids"] and s["labels"] == c["labels"]
    assert any(-100 in s["labels"] for s in streamed)  # prompts masked


def test_a_shuffle_buffer_draws_the_same_samples_in_another_order(arithmetic_jsonl, tiny_base):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    data = DataSection(source=str(arithmetic_jsonl), format="alpaca", template="alpaca-short",
                       max_length=64, streaming=True, shuffle_buffer=16)
    ordered = [r["input_ids"] for r in tokenized_stream(data, tok, seed=0, shuffle=False)]
    shuffled = [r["input_ids"] for r in tokenized_stream(data, tok, seed=0)]
    assert shuffled != ordered and sorted(shuffled) == sorted(ordered)
    assert shuffled == [r["input_ids"] for r in tokenized_stream(data, tok, seed=0)]  # seeded: the same each time


def test_a_bad_record_in_the_stream_fails_as_the_cached_path_does(alpaca_jsonl, tiny_base):
    lines = alpaca_jsonl.read_text().splitlines()
    lines[7] = json.dumps({"instruction": "Say hi.", "input": ""})  # no output
    alpaca_jsonl.write_text("\n".join(lines) + "\n")
    tok = AutoTokenizer.from_pretrained(tiny_base)
    cached = DataSection(source=str(alpaca_jsonl), format="alpaca")
    with pytest.raises(DataError) as from_cache:
        load_examples(cached, 0)
    with pytest.raises(DataError) as from_stream:
        list(tokenized_rows(DataSection(source=str(alpaca_jsonl), format="alpaca", streaming=True), tok))
    assert str(from_stream.value) == str(from_cache.value)
    assert f"{alpaca_jsonl}: record 7:" in str(from_stream.value) and "output" in str(from_stream.value)


@pytest.mark.parametrize(("change", "key"), [
    ({"train": {"max_steps": None}}, "train.max_steps"),
    ({"data": {"val_size": 0.1}}, "data.val_size"),
    ({"task": "dpo", "data": {"format": "preference"}}, "data.streaming"),
])
def test_a_streaming_recipe_without_what_it_needs_is_a_recipe_error(change, key, tmp_path, capsys, alpaca_jsonl):
    recipe = sft_recipe("some/model", alpaca_jsonl, tmp_path / "out")
    for section, values in change.items():
        if isinstance(values, dict):
            recipe[section].update(values)
        else:
            recipe[section] = values
    recipe["train"] = {k: v for k, v in recipe["train"].items() if v is not None}
    path = write_recipe(tmp_path, "bad", recipe)
    assert main(["validate", str(path)]) == 2
    assert key in capsys.readouterr().err


def test_a_streamed_sft_run_trains(tmp_path, tiny_base, arithmetic_jsonl):
    run = setup(load_recipe(str(write_recipe(tmp_path, "s", sft_recipe(tiny_base, arithmetic_jsonl, tmp_path / "out")))))
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    summary = finish(run)
    assert summary["global_step"] == 6 and summary["samples"] == "streamed"
    after = dict(run.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach()) for n in before)


def test_a_packed_stream_trains(tmp_path, tiny_base, arithmetic_jsonl):
    # trl packs an IterableDataset as it packs a Dataset (data_prep/streaming.py).
    recipe = sft_recipe(tiny_base, arithmetic_jsonl, tmp_path / "out", packing=True, max_length=128)
    recipe["train"]["max_steps"] = 2
    summary = finish(setup(load_recipe(str(write_recipe(tmp_path, "p", recipe)))))
    assert summary["global_step"] == 2


def test_a_resumed_stream_continues_where_it_stopped(tmp_path, tiny_base, arithmetic_jsonl):
    def recipe(out):
        r = sft_recipe(tiny_base, arithmetic_jsonl, out)
        r["train"].update(max_steps=6, save_steps=3)
        # The adapter is initialised before the Trainer seeds the process: seeded here, both runs start alike.
        torch.manual_seed(0)
        return load_recipe(str(write_recipe(tmp_path, out.name, r)))

    def tokens_per_step(history):
        # trl's token counter is not in the checkpoint: it starts again from 0 in a resumed run.
        seen = [0] + [e["num_tokens"] for e in history if "loss" in e]
        return [b if b < a else b - a for a, b in zip(seen, seen[1:])]

    ref_run = setup(recipe(tmp_path / "ref"))
    reference = finish(ref_run)
    reference_history = ref_run.trainer.state.log_history
    run = setup(recipe(tmp_path / "cut"))
    run.trainer.add_callback(StopAt(3))
    finish(run)
    (tmp_path / "cut" / SUMMARY).unlink()  # an interrupted run has no summary (written last)

    run = setup(recipe(tmp_path / "cut"))
    assert run.resume == tmp_path / "cut" / "checkpoint-3"
    summary = finish(run)
    assert summary["global_step"] == reference["global_step"] == 6
    # The batches after the checkpoint are those of the uninterrupted run (the stream was read past the first
    # three): the same tokens per step and the same losses.
    history = run.trainer.state.log_history
    resumed = tokens_per_step(history)
    assert len(resumed) == 6 and resumed[3:] == tokens_per_step(reference_history)[3:]
    assert summary["final_loss"] == pytest.approx(reference["final_loss"], abs=1e-4)


def test_a_streamed_eval_split_is_evaluated(tmp_path, tiny_base):
    recipe = sft_recipe(tiny_base, "builtin:arithmetic", tmp_path / "out", eval_split="test")
    recipe["train"]["max_steps"] = 2
    summary = finish(setup(load_recipe(str(write_recipe(tmp_path, "e", recipe)))))
    # The held-out split is streamed too (in order): measured before and after training.
    assert summary["global_step"] == 2 and math.isfinite(summary["eval_loss"])
    assert math.isfinite(summary["eval_before"]["eval_loss"])


def test_the_planner_never_reads_a_streamed_corpus_to_count_it(tmp_path, tiny_base, arithmetic_jsonl, monkeypatch):
    """A streamed corpus may be larger than memory: the plan gives time per step instead of counting records."""
    import data_prep.sources
    from hf_vram.vram.plan import dataset_size

    loaded = load_recipe(str(write_recipe(tmp_path, "plan", sft_recipe(tiny_base, arithmetic_jsonl, tmp_path / "out"))))
    assert dataset_size(loaded) is None

    def refuse(*a, **k):
        raise AssertionError("the corpus was read to be counted")

    monkeypatch.setattr(data_prep.sources, "read_records", refuse)
    assert dataset_size(loaded) is None


def test_two_processes_share_one_stream_without_reading_a_sample_twice(tmp_path, tiny_base, alpaca_jsonl):
    """With --nproc 2, accelerate's dispatcher (the default for an IterableDataset) reads the stream on the main
    process and hands each rank its own part of every batch: two ranks of micro-batch 4 train on exactly the
    samples one process of micro-batch 8 trains on (trl counts the tokens of every rank; Alpaca's answers differ in
    length, so two ranks reading the same samples would count other totals), and end identical."""
    from .conftest import run_cli

    two = sft_recipe(tiny_base, alpaca_jsonl, tmp_path / "two", max_length=512)
    proc = run_cli("train", str(write_recipe(tmp_path, "two", two)), "--nproc", "2", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "two" / SUMMARY).read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 6 and summary["samples"] == "streamed"
    assert len(set(summary["rank_checksums"])) == 1, "DDP kept the ranks' weights identical"

    one = sft_recipe(tiny_base, alpaca_jsonl, tmp_path / "one", max_length=512)
    one["train"]["micro_batch_size"] = 8
    run = setup(load_recipe(str(write_recipe(tmp_path, "one", one))))
    finish(run)
    # The final checkpoint's trainer state holds the two-process run's log.
    two_history = json.loads((tmp_path / "two" / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    single = [e["num_tokens"] for e in run.trainer.state.log_history if "loss" in e]
    both = [e["num_tokens"] for e in two_history if "loss" in e]
    assert len(both) == 6 and both == single, (both, single)
