"""Record formats -> the columns trl's SFTTrainer trains on.

text   -> {"text"}: every token is trained (pretraining).
alpaca -> {"prompt", "completion"}: trl trains the completion only (unless data.train_on_prompt) and
          appends EOS to it.
A record that does not fit its declared format is an error naming the source, the record index and the
field: training on empty strings is never silent.
"""

from __future__ import annotations

from hf_vram.errors import DataError

ALPACA_PREAMBLE = {
    False: "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n",
    True: (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
    ),
}
ALPACA_TEMPLATES = ("alpaca", "alpaca-short")


def alpaca_prompt(instruction: str, input_text: str = "", template: str = "alpaca") -> str:
    """Stanford Alpaca's prompt; alpaca-short drops the preamble (small models, short sequences)."""
    has_input = bool(input_text and input_text.strip())
    head = ALPACA_PREAMBLE[has_input] if template == "alpaca" else ""
    body = f"### Instruction:\n{instruction}\n\n"
    if has_input:
        body += f"### Input:\n{input_text}\n\n"
    return head + body + "### Response:\n"


def _field(record: dict, name: str, index: int, source: str, fmt: str, required: bool = True) -> str:
    if name not in record or record[name] is None:
        if not required:
            return ""
        present = ", ".join(sorted(record)) or "no fields"
        raise DataError(
            f"{source}: record {index}: missing field '{name}' for format '{fmt}' (the record has: {present}); "
            "fix the record or set data.format to the layout the file has"
        )
    value = record[name]
    if not isinstance(value, str):
        raise DataError(f"{source}: record {index}: field '{name}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise DataError(f"{source}: record {index}: field '{name}' is empty")
    return value


def to_training_rows(records, fmt: str, source: str, template: str = "alpaca", text_field: str = "text") -> list[dict]:
    """Check every record against the format and convert it to trl's columns."""
    rows = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{source}: record {i}: expected a mapping of fields, got {type(rec).__name__}")
        if fmt == "text":
            rows.append({"text": _field(rec, text_field, i, source, fmt)})
        elif fmt == "alpaca":
            instruction = _field(rec, "instruction", i, source, fmt)
            input_text = _field(rec, "input", i, source, fmt, required=False)
            output = _field(rec, "output", i, source, fmt)
            rows.append({"prompt": alpaca_prompt(instruction, input_text, template), "completion": output})
        else:
            raise DataError(f"{source}: unknown format '{fmt}'")
    if not rows:
        raise DataError(f"{source}: no records")
    return rows
