"""Records are checked against their declared format; the generated demo data keeps its test split apart."""

from __future__ import annotations

import json

import pytest

from data_prep.builtin import BUILTIN_SOURCES
from data_prep.formats import alpaca_prompt, to_examples
from data_prep.sources import read_records
from hf_vram.errors import DataError


def test_alpaca_records_are_prompt_and_completion():
    rows = to_examples([{"instruction": "Add 2 and 3.", "input": "", "output": "5"}], "alpaca", "x.json", template="alpaca-short")
    assert rows == [[("prompt", "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"), ("completion", "5")]]
    full = alpaca_prompt("Sum these.", "2, 3", "alpaca")
    assert full.startswith("Below is an instruction that describes a task, paired with an input")
    assert "### Input:\n2, 3\n\n### Response:\n" in full


def test_sharegpt_file_read_as_alpaca_fails_naming_file_record_and_field(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]))
    records = read_records(str(path), "alpaca")
    with pytest.raises(DataError) as e:
        to_examples(records, "alpaca", str(path))
    msg = str(e.value)
    assert f"{path}: record 0: missing field 'instruction' for format 'alpaca'" in msg
    assert "the record has: conversations" in msg


def test_empty_response_is_an_error_not_a_silent_empty_target():
    with pytest.raises(DataError, match="record 1: field 'output' is empty"):
        to_examples([{"instruction": "a", "output": "b"}, {"instruction": "c", "output": " "}], "alpaca", "d.jsonl")


def test_text_files_read_through_datasets(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"line {i}"}) for i in range(3)))
    rows = to_examples(read_records(str(path), "text"), "text", str(path), text_field="body")
    assert rows == [[("text", f"line {i}")] for i in range(3)]
    with pytest.raises(DataError, match="missing field 'text'"):
        to_examples(read_records(str(path), "text"), "text", str(path))


def test_arithmetic_test_split_is_held_out_of_instruction_training():
    task = BUILTIN_SOURCES["arithmetic"]
    train = {r["instruction"] for r in task.records("alpaca", "train")}
    test = {r["instruction"] for r in task.records("alpaca", "test")}
    assert len(test) == 20 and len(train) == 3 * 80  # three phrasings of each training question
    assert not train & test
    corpus = "\n".join(r["text"] for r in task.records("text"))
    test_sums = [r["instruction"].removeprefix("What is ").removesuffix("?") for r in task.records("alpaca", "test")]
    assert all(f"{s} = " in corpus for s in test_sums)  # the corpus states every sum: the knowledge to recall
    assert "### Instruction:" not in corpus and "### Response:" not in corpus  # the layout is the fine-tune's


def test_blank_lines_of_text_files_are_skipped(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("First paragraph.\n\nSecond paragraph.\n")
    assert [r["text"] for r in read_records(str(path), "text")] == ["First paragraph.", "Second paragraph."]
