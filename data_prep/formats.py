"""Record formats -> one common shape, checked record by record.

Every record becomes a list of turns `(role, text)`:
  text               -> [("text", t)]                                    every token trained
  alpaca             -> [("prompt", template(instruction, input)), ("completion", output)]
  prompt_completion  -> [("prompt", p), ("completion", c)]
  sharegpt, messages -> [("system"|"user"|"assistant", content), ...]    rendered by a chat template later
  preference         -> a Pair: the conversation before the answer, the chosen and the rejected answer
A record that does not fit its declared format is an error naming the source, the record index and the
field: a ShareGPT file read as Alpaca fails on its first record instead of training on empty strings.
"""

from __future__ import annotations

from dataclasses import dataclass

from data_prep.errors import DataError

ALPACA_PREAMBLE = {
    False: "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n",
    True: (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
    ),
}
ALPACA_TEMPLATES = ("alpaca", "alpaca-short")
CHAT_FORMATS = ("sharegpt", "messages")

# ShareGPT speakers as the datasets in the wild name them -> chat roles.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
}
MESSAGE_ROLES = ("system", "user", "assistant")


@dataclass
class Pair:
    """A preference record: the conversation up to the answer, and the chosen and rejected answers."""

    prompt: list[tuple[str, str]]
    chosen: str
    rejected: str


def alpaca_prompt(instruction: str, input_text: str = "", template: str = "alpaca") -> str:
    """Stanford Alpaca's prompt; alpaca-short drops the preamble (small models, short sequences)."""
    has_input = bool(input_text and input_text.strip())
    head = ALPACA_PREAMBLE[has_input] if template == "alpaca" else ""
    body = f"### Instruction:\n{instruction}\n\n"
    if has_input:
        body += f"### Input:\n{input_text}\n\n"
    return head + body + "### Response:\n"


class _Record:
    """One record being read: every complaint names the source, the index and the field."""

    def __init__(self, record, index: int, source: str, fmt: str, placeholders: dict[str, str]):
        self.index, self.source, self.fmt, self.placeholders = index, source, fmt, placeholders
        if not isinstance(record, dict):
            self.fail(f"expected a mapping of fields, got {type(record).__name__}")
        self.record = record

    def fail(self, message: str):
        raise DataError(f"{self.source}: record {self.index}: {message}")

    def fill(self, text: str) -> str:
        for key, value in self.placeholders.items():
            text = text.replace("{{" + key + "}}", value)
        return text

    def has(self, name: str) -> bool:
        return self.record.get(name) is not None

    def get(self, name: str, required: bool = True):
        if not self.has(name):
            if not required:
                return None
            # Arrow gives every record the columns of the whole file: a field another record has reads as null
            # here, so the fields named are the ones this record fills.
            filled = ", ".join(sorted(k for k, v in self.record.items() if v is not None)) or "no fields"
            if name in self.record:
                self.fail(
                    f"field '{name}' is null (the record fills: {filled}); give '{name}' a value in the file, or "
                    "delete the record (a field left out of one record, where other records have it, reads as null too)"
                )
            nested = self.nested_under(name)
            hint = (f"; the records seem to be nested under '{nested}': give the list itself as the file's content "
                    "([{...}, {...}]) or as JSON Lines") if nested else ""
            self.fail(
                f"missing field '{name}' for format '{self.fmt}' (the record has: {filled}); "
                f"fix the record or set data.format to the layout the file has{hint}"
            )
        return self.record[name]

    def nested_under(self, name: str) -> str | None:
        """The field holding a list of records that have `name` (a file of {"data": [records]} read as one record)."""
        for key, value in self.record.items():
            if isinstance(value, list) and value and isinstance(value[0], dict) and name in value[0]:
                return key
        return None

    def text(self, value, where: str, required: bool = True) -> str:
        if value is None and not required:
            return ""
        if value is None:
            self.fail(f"field '{where}' is null; give it a value in the file, or delete the record")
        if not isinstance(value, str):
            self.fail(f"field '{where}' must be a string, got {type(value).__name__}")
        if required and not value.strip():
            self.fail(f"field '{where}' is empty")
        return self.fill(value)

    def field(self, name: str, required: bool = True) -> str:
        return self.text(self.get(name, required), name, required)

    def turns(self, name: str, speaker: str, content: str, roles: dict[str, str]) -> list[tuple[str, str]]:
        """A list of {speaker: role, content: text} turns (ShareGPT's from/value, or role/content)."""
        turns = self.get(name)
        if not isinstance(turns, list) or not turns:
            self.fail(f"field '{name}' must be a non-empty list of turns, got {type(turns).__name__}")
        return [self.turn(t, f"{name}[{j}]", speaker, content, roles) for j, t in enumerate(turns)]

    def turn(self, t, where: str, speaker: str, content: str, roles: dict[str, str]) -> tuple[str, str]:
        if not isinstance(t, dict) or speaker not in t or content not in t:
            got = ", ".join(sorted(t)) if isinstance(t, dict) else type(t).__name__
            self.fail(f"{where} must have '{speaker}' and '{content}' (got: {got})")
        role = roles.get(str(t[speaker]).lower())
        if role is None:
            self.fail(f"{where}.{speaker} is '{t[speaker]}'; expected one of {', '.join(sorted(set(roles)))}")
        return role, self.text(t[content], f"{where}.{content}")


def _chat(rec: _Record, fmt: str) -> list[tuple[str, str]]:
    if fmt == "sharegpt":
        turns = rec.turns("conversations", "from", "value", SHAREGPT_ROLES)
        if rec.has("system"):  # LLaMA-Factory's ShareGPT variant keeps the system prompt beside the turns
            turns.insert(0, ("system", rec.field("system")))
    else:
        turns = rec.turns("messages", "role", "content", {r: r for r in MESSAGE_ROLES})
    if not any(role == "assistant" for role, _ in turns):
        rec.fail(f"the conversation has no assistant turn: nothing to train on (roles: {', '.join(r for r, _ in turns)})")
    return turns


def _answer(rec: _Record, name: str) -> str:
    """One side of a preference pair: a string, a ShareGPT turn, or a message list ending with the answer."""
    value = rec.get(name)
    if isinstance(value, str):
        return rec.text(value, name)
    if isinstance(value, dict):
        speaker, content = ("from", "value") if "from" in value else ("role", "content")
        role, text = rec.turn(value, name, speaker, content, {**SHAREGPT_ROLES, **{r: r for r in MESSAGE_ROLES}})
        if role != "assistant":
            rec.fail(f"{name} must be an assistant turn, got role '{role}'")
        return text
    if isinstance(value, list) and value:
        role, text = rec.turn(value[-1], f"{name}[-1]", "role", "content", {r: r for r in MESSAGE_ROLES})
        if role != "assistant":
            rec.fail(f"{name} must end with the assistant's answer, got role '{role}'")
        return text
    rec.fail(f"field '{name}' must be a string, a turn, or a list of messages, got {type(value).__name__}")


def _pair(rec: _Record) -> Pair:
    chosen, rejected = _answer(rec, "chosen"), _answer(rec, "rejected")
    if rec.has("conversations"):  # LLaMA-Factory's pair layout: the conversation, then one chosen/rejected turn
        prompt = rec.turns("conversations", "from", "value", SHAREGPT_ROLES)
    elif rec.has("prompt"):
        value = rec.get("prompt")
        prompt = (
            [("user", rec.text(value, "prompt"))]
            if isinstance(value, str)
            else rec.turns("prompt", "role", "content", {r: r for r in MESSAGE_ROLES})
        )
    elif isinstance(rec.get("chosen"), list):  # conversational pairs: the prompt is the chosen list minus its answer
        prompt = [rec.turn(t, f"chosen[{j}]", "role", "content", {r: r for r in MESSAGE_ROLES}) for j, t in enumerate(rec.get("chosen")[:-1])]
    else:
        prompt = []
    if not prompt or prompt[-1][0] != "user":
        rec.fail("a preference pair needs the conversation before the answer, ending with a user turn "
                 "('prompt', or 'conversations', or 'chosen' as a message list)")
    if chosen == rejected:
        rec.fail("chosen and rejected are the same text: the pair teaches nothing")
    return Pair(prompt, chosen, rejected)


def to_examples(
    records, fmt: str, source: str, template: str = "alpaca", text_field: str = "text", placeholders: dict | None = None
) -> list:
    """Check every record against the format; turns per record (a Pair for preference data)."""
    out = []
    for i, raw in enumerate(records):
        rec = _Record(raw, i, source, fmt, placeholders or {})
        if fmt == "text":
            out.append([("text", rec.field(text_field))])
        elif fmt == "alpaca":
            prompt = alpaca_prompt(rec.field("instruction"), rec.field("input", required=False), template)
            out.append([("prompt", prompt), ("completion", rec.field("output"))])
        elif fmt == "prompt_completion":
            out.append([("prompt", rec.field("prompt")), ("completion", rec.field("completion"))])
        elif fmt in CHAT_FORMATS:
            out.append(_chat(rec, fmt))
        elif fmt == "preference":
            out.append(_pair(rec))
        else:
            raise DataError(f"{source}: unknown format '{fmt}'")
    if not out:
        raise DataError(f"{source}: no records")
    return out
