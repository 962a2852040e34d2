"""Task grpo's data: prompts, each with the answer its completions are rewarded against, as trl's GRPOTrainer
reads them ({prompt, answer}: the prompt as text, or as messages for chat formats, which the trainer renders with
the tokenizer's chat template; every column but the prompt reaches the reward functions).

From the prompt layouts: alpaca (instruction/input -> the alpaca prompt, output -> answer), prompt_completion
(completion -> answer), sharegpt/messages (the last assistant turn -> answer, the turns before it the prompt).
Records of another layout (GSM8K's question/answer) are mapped by grpo.prompt_field / grpo.answer_field."""

from __future__ import annotations

from data_prep.errors import DataError
from data_prep.formats import CHAT_FORMATS, to_examples


def mapped_record(record: dict, prompt_field: str, answer_field: str, fmt: str) -> dict:
    """A record of another layout in format fmt's fields: messages (a user turn, an assistant answer) or
    prompt_completion."""
    prompt, answer = record.get(prompt_field), record.get(answer_field)
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
    return {"prompt": prompt, "completion": answer}


def grpo_examples(data, grpo, seed: int) -> list:
    """The training examples (turns per record) of a grpo recipe: through load_examples, or, with a field
    mapping, its records mapped into data.format's layout first."""
    if not grpo.prompt_field:
        from data_prep.prepare import load_examples

        return load_examples(data, seed).train
    from data_prep.sources import read_records

    records = read_records(data.source, data.format, data.split, data.subset)
    missing = [f for f in (grpo.prompt_field, grpo.answer_field) if records and f not in records[0]]
    if missing:
        raise DataError(f"{data.source}: grpo.prompt_field / answer_field: the records have no field "
                        f"'{missing[0]}' (they have: {', '.join(sorted(records[0]))})")
    records = records[: data.max_samples] if data.max_samples else records
    mapped = [mapped_record(r, grpo.prompt_field, grpo.answer_field, data.format) for r in records]
    return to_examples(mapped, data.format, data.source, data.template, data.text_field, data.placeholders)


def _chat_row(turns, source: str, index: int) -> dict:
    last = max((i for i, t in enumerate(turns) if t[0] == "assistant"), default=None)
    if last is None or last == 0:
        raise DataError(f"{source}: record {index}: task grpo needs a prompt and an assistant turn after it (the "
                        "answer the completions are rewarded against)")
    prompt = [{"role": role, "content": text} for role, text in turns[:last] if role in ("system", "user", "assistant")]
    return {"prompt": prompt, "answer": turns[last][1]}


def grpo_rows(examples: list, fmt: str, source: str) -> list[dict]:
    """Examples -> trl's {prompt, answer} rows."""
    if fmt in CHAT_FORMATS:
        return [_chat_row(turns, source, i) for i, turns in enumerate(examples)]
    return [{"prompt": dict(turns)["prompt"], "answer": dict(turns)["completion"]} for turns in examples]


def grpo_dataset(examples: list, data):
    """The training dataset (datasets.Dataset of {prompt, answer}) and its counts. trl's GRPOTrainer tokenizes the
    prompts itself, so nothing goes through prepare_dataset's tokenization or its cache."""
    import datasets

    rows = grpo_rows(examples, data.format, data.source)
    return datasets.Dataset.from_list(rows), {"train": {"prompts": len(rows)}}
