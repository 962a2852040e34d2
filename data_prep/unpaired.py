"""Unpaired feedback (format unpaired, for task kto): one answer per record with a verdict, desirable or not, in
place of a chosen/rejected pair (KTO, Ethayarajh et al., arXiv 2402.01306, learns from such binary signals).

Record layouts:
  {"prompt": text | [messages], "completion": text | turn | [messages], "label": bool}   trl's unpaired layout
                                                                                         (trl-lib/kto-mix-14k)
  {"messages" | "conversations": [turns], "label" | "kto_tag": bool}   a conversation whose last turn, the
                                                                         assistant's, is the answer judged
Every complaint names the source, the record index and the field, as data_prep/formats.py does.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_prep.errors import DataError
from data_prep.formats import MESSAGE_ROLES, SHAREGPT_ROLES, RecordReader

# Where the verdict is read from: trl's column, then LLaMA-Factory's (its KTO data tags ShareGPT conversations).
LABEL_FIELDS = ("label", "kto_tag")
_ROLES = {**SHAREGPT_ROLES, **{r: r for r in MESSAGE_ROLES}}


@dataclass
class Unpaired:
    """One judged answer: the conversation up to it, the answer, and whether it is desirable."""

    prompt: list[tuple[str, str]]
    completion: str
    label: bool

    def __iter__(self):
        # Read as the turns of a conversation where text is wanted (a tokenizer trained on the data).
        yield from self.prompt
        yield "assistant", self.completion


class _Reader(RecordReader):
    """A record read as format unpaired: the shared reader's text and complaints (source, index, field, null or
    missing), and turns in either chat layout (ShareGPT's from/value or role/content)."""

    def __init__(self, record, index: int, source: str, placeholders: dict[str, str]):
        super().__init__(record, index, source, "unpaired", placeholders)

    def turn(self, t, where: str) -> tuple[str, str]:
        speaker, content = ("from", "value") if isinstance(t, dict) and "from" in t else ("role", "content")
        if not isinstance(t, dict) or speaker not in t or content not in t:
            got = ", ".join(sorted(t)) if isinstance(t, dict) else type(t).__name__
            self.fail(f"{where} must have 'role' and 'content' (or 'from' and 'value') (got: {got})")
        # Either layout's roles, checked and read by the shared reader.
        return super().turn(t, where, speaker, content, _ROLES)

    def turns(self, value, where: str) -> list[tuple[str, str]]:
        if not isinstance(value, list) or not value:
            self.fail(f"field '{where}' must be a non-empty list of turns, got {type(value).__name__}")
        return [self.turn(t, f"{where}[{j}]") for j, t in enumerate(value)]

    def answer(self, value) -> str:
        """The completion: a string, one assistant turn, or a message list ending with the answer."""
        if isinstance(value, str):
            return self.text(value, "completion")
        role, text = self.turn(value, "completion") if isinstance(value, dict) else self.turns(value, "completion")[-1]
        if role != "assistant":
            self.fail(f"completion must be (or end with) the assistant's answer, got role '{role}'")
        return text

    def label(self) -> bool:
        name = next((n for n in LABEL_FIELDS if self.has(n)), None)
        if name is None:
            self.fail("missing field 'label' (or 'kto_tag'): true for a desirable answer, false for an undesirable one")
        value = self.record[name]
        if not isinstance(value, bool):
            self.fail(f"field '{name}' must be true or false (a desirable or an undesirable answer), got "
                      f"{value!r} ({type(value).__name__})")
        return value


def _example(rec: _Reader) -> Unpaired:
    chat = next((n for n in ("messages", "conversations") if rec.has(n)), None)
    if chat:
        turns = rec.turns(rec.get(chat), chat)
        if turns[-1][0] != "assistant":
            rec.fail(f"'{chat}' must end with the assistant's answer (the one judged), got role '{turns[-1][0]}'")
        prompt, completion = turns[:-1], turns[-1][1]
    else:
        value = rec.get("prompt")
        prompt = [("user", rec.text(value, "prompt"))] if isinstance(value, str) else rec.turns(value, "prompt")
        completion = rec.answer(rec.get("completion"))
    if not prompt or prompt[-1][0] != "user":
        rec.fail("the answer judged needs the conversation before it, ending with a user turn")
    return Unpaired(prompt, completion, rec.label())


def unpaired_examples(records, source: str, placeholders: dict[str, str] | None = None) -> list[Unpaired]:
    """Every record checked and read as an Unpaired example."""
    out = [_example(_Reader(raw, i, source, placeholders or {})) for i, raw in enumerate(records)]
    if not out:
        raise DataError(f"{source}: no records")
    return out


def label_counts(examples: list[Unpaired]) -> dict[str, int]:
    desirable = sum(e.label for e in examples)
    return {"examples": len(examples), "desirable": desirable, "undesirable": len(examples) - desirable}


def check_both_labels(examples: list[Unpaired], source: str) -> None:
    """KTO weighs desirable answers up and undesirable ones down against the same reference point: with one kind
    missing, half of its loss never occurs, and the policy only drifts."""
    c = label_counts(examples)
    if not c["desirable"] or not c["undesirable"]:
        raise DataError(f"{source}: {c['desirable']} desirable and {c['undesirable']} undesirable examples (label "
                        "true / false): task kto needs both kinds; add the missing kind of answers, or train with "
                        "task sft on the desirable ones")


def unpaired_rows(examples: list[Unpaired]) -> list[dict]:
    """trl's conversational unpaired columns (prompt, completion, label): the KTO trainer renders them with the
    tokenizer's chat template, as the DPO trainer does its pairs (data_prep/prepare.py)."""
    return [{"prompt": [{"role": r, "content": c} for r, c in e.prompt],
             "completion": [{"role": "assistant", "content": e.completion}], "label": e.label} for e in examples]
