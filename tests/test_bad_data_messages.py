"""Bad local data files give a message that names the file, the line or record, and the fix: exit code 2 from the
CLI, a DataError from data_prep, and never datasets' own "An error occurred while generating the dataset"."""

from __future__ import annotations

import json

import pytest

from data_prep.errors import DataError
from data_prep.formats import to_examples
from data_prep.shards import iter_documents
from data_prep.sources import json_problem, read_records

from .conftest import write_recipe

GOOD = {"instruction": "Say hi.", "input": "", "output": "hi"}


def jsonl(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def prepare(tmp_path, tiny_base, capsys, name: str, content: str) -> tuple[int, str]:
    """`hf-vram prepare` of a LoRA recipe on the file: the exit code and what it printed to stderr."""
    from hf_vram.cli import main

    source = tmp_path / name
    source.write_text(content)
    recipe = {
        "model": {"name_or_path": str(tiny_base)},
        "adapter": {"type": "lora"},
        "data": {"source": str(source), "format": "alpaca", "max_length": 64},
        "train": {"output_dir": str(tmp_path / "out")},
    }
    code = main(["prepare", str(write_recipe(tmp_path, "bad-data", recipe))])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "An error occurred while generating the dataset" not in err
    return code, err


def test_a_null_field_is_named_as_null_with_the_fix(tmp_path, tiny_base, capsys):
    code, err = prepare(tmp_path, tiny_base, capsys, "null.jsonl", jsonl(GOOD, {**GOOD, "output": None}))
    assert code == 2
    assert f"{tmp_path / 'null.jsonl'}: record 1: field 'output' is null (the record fills: input, instruction)" in err
    assert "give 'output' a value in the file, or delete the record" in err
    assert "missing field" not in err


def test_a_broken_json_lines_line_is_named_and_the_rest_is_fine(tmp_path, tiny_base, capsys):
    lines = jsonl(GOOD, GOOD, GOOD, '{"instruction": "x", "output": "y"', GOOD, GOOD, GOOD)
    code, err = prepare(tmp_path, tiny_base, capsys, "broken.jsonl", lines)
    assert code == 2
    assert f"{tmp_path / 'broken.jsonl'}: line 4: not valid JSON (Expecting ',' delimiter at column 35)" in err
    assert "1 bad line, the other 6 lines are fine; fix or delete that line" in err


def test_an_empty_json_list_has_no_records(tmp_path, tiny_base, capsys):
    code, err = prepare(tmp_path, tiny_base, capsys, "empty.json", "[]")
    assert code == 2
    assert f"{tmp_path / 'empty.json'}: the file holds an empty list, so it has no records" in err
    assert "corresponds to no data" not in err


def test_an_empty_json_lines_file_has_no_records(tmp_path, tiny_base, capsys):
    code, err = prepare(tmp_path, tiny_base, capsys, "empty.jsonl", "")
    assert code == 2
    assert f"{tmp_path / 'empty.jsonl'}: the file is empty, so it has no records" in err
    assert "StopIteration" not in err


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("blank.jsonl", "\n  \n\n", "the file has only blank lines, so it has no records"),
        ("blank.json", "\n\n", "the file holds only blank space, so it has no records"),
        ("empty.csv", "", "the file is empty, so it has no records"),
        ("scalar.json", '"just text"', "the file holds a JSON string, not records; give a list of objects"),
        ("items.json", json.dumps([GOOD, 3]), "record 1 is a JSON number, not an object"),
        ("broken.json", '[{"instruction": "x", "output": "y"},\n {"instruction": "x" "output": "y"}]',
         "not valid JSON at line 2, column 22: Expecting ',' delimiter; fix the file there"),
        # JSON Lines under the .json suffix (datasets reads it): checked line by line.
        ("lines.json", jsonl(GOOD, '{"instruction": "x"', GOOD), "line 2: not valid JSON (Expecting ',' delimiter at column 20)"),
        ("list-line.jsonl", jsonl(GOOD, [GOOD]), "line 2: a JSON list, not an object of fields. 1 bad line, the other line is fine"),
    ],
)
def test_unreadable_files_are_named_with_what_is_wrong(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=f"^{path}: ") as e:
        read_records(str(path), "alpaca")
    assert message in str(e.value)


def test_several_bad_lines_are_counted_and_the_first_named(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text(jsonl(GOOD, "{", "[1]", "nope", "{}x", GOOD))
    problem = json_problem(path, str(path))
    assert problem.startswith(f"{path}: line 2: not valid JSON")
    assert "line 3: a JSON list" in problem and "line 4: not valid JSON" in problem and "and 1 more" in problem
    assert "4 bad lines, the other 2 lines are fine; fix or delete those lines" in problem


def test_a_good_file_has_no_json_problem(tmp_path):
    path = tmp_path / "good.jsonl"
    path.write_text(jsonl(GOOD, GOOD))
    assert json_problem(path, str(path)) is None
    assert len(read_records(str(path), "alpaca")) == 2


def test_a_json_object_is_one_record_and_nested_records_are_pointed_at(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps(GOOD))
    assert len(to_examples(read_records(str(one), "alpaca"), "alpaca", str(one))) == 1

    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"data": [GOOD, GOOD]}))
    with pytest.raises(DataError, match="missing field 'instruction'.*the records seem to be nested under 'data'"):
        to_examples(read_records(str(nested), "alpaca"), "alpaca", str(nested))


def test_a_null_turn_is_named_as_null():
    record = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": None}]}
    with pytest.raises(DataError, match=r"s: record 0: field 'conversations\[1\]\.value' is null; give it a value"):
        to_examples([record], "sharegpt", "s")


def test_pretraining_documents_name_the_broken_line_and_the_empty_file(tmp_path):
    broken = tmp_path / "docs.jsonl"
    broken.write_text(jsonl({"text": "a"}, '{"text": "b"', {"text": "c"}))
    with pytest.raises(DataError, match=f"{broken}: line 2: not valid JSON .*the other 2 lines are fine"):
        list(iter_documents(str(broken)))
    empty = tmp_path / "none.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=f"{empty}: the file is empty, so it has no documents"):
        iter_documents(str(empty))


def test_datasets_own_row_numbered_log_is_not_shown_beside_the_line(tmp_path):
    import logging

    from data_prep.sources import _JSON_LOADER_LOGGER

    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    logger = logging.getLogger(_JSON_LOADER_LOGGER)
    logger.addHandler(handler)
    path = tmp_path / "broken.jsonl"
    path.write_text(jsonl(GOOD, '{"instruction": "x"', GOOD))
    try:
        with pytest.raises(DataError, match="line 2: not valid JSON"):
            read_records(str(path), "alpaca")
        with pytest.raises(DataError, match="line 2: not valid JSON"):
            list(iter_documents(str(path), text_field="instruction"))
    finally:
        logger.removeHandler(handler)
    assert not [r for r in seen if r.levelno >= logging.ERROR]
    assert not logger.filters
