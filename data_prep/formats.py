"""Record formats -> one common shape, checked record by record.

Every record becomes a list of turns `(role, text)`:
  text               -> [("text", t)]                                    every token trained
  alpaca             -> [("prompt", template(instruction, input)), ("completion", output)]
  prompt_completion  -> [("prompt", p), ("completion", c)]
  sharegpt, messages -> [("system"|"user"|"assistant", content), ...]    rendered by a chat template later
  preference         -> a Pair: the conversation before the answer, the chosen and the rejected answer
A record that does not fit its declared format is an error naming the source, the record index and the
field: a ShareGPT file read as Alpaca fails on its first record instead of training on empty strings.

Chat turns are `Turn`s: they unpack as `(role, text)`, and carry what a pair cannot hold:
  tool calls      ShareGPT `function_call` turns ({"name", "arguments"} as JSON), or an OpenAI assistant message's
                  `tool_calls` ([{"type": "function", "function": {"name", "arguments"}}], arguments a JSON string
                  or an object): an assistant turn, trained
  tool results    ShareGPT `observation` turns, or messages of role `tool` (`tool_call_id`, `name`): role "tool",
                  never trained
  tool schemas    the record's `tools` (a JSON string or a list): a leading ("tools", json) turn
  content parts   `content` as [{"type": "text", "text"|"value": ...}, ...]: the text parts joined as they are; a
                  {"type": "thinking"|"reasoning"} part, or `reasoning_content` / `thinking` beside the content, is
                  the turn's reasoning. Image, audio and video parts are refused: the models trained here read text.
  loss overrides  `loss_weight: 0` or `train: false` masks an assistant turn (context, not trained); 1 / true on
                  any other turn is refused (data.train_on_prompt trains prompts)
Null values inside tool schemas and call arguments are dropped: Arrow gives every record the keys that any record
has, so a null there is almost always a key of another tool.

Fields another task reads are refused in the SFT formats (`label` / `kto_tag`: task kto; `chosen` / `rejected`:
task dpo), since training on them as plain answers would ignore what they say. A `score` is only reported: rating
columns (FineTome-100k's quality score) are common metadata of SFT sets, and no SFT format reads them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from data_prep.errors import DataError

log = logging.getLogger(__name__)

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
# Chat turns may also be tool calls and tool results (LLaMA-Factory's ShareGPT names, OpenAI's role "tool").
CHAT_SHAREGPT_ROLES = {**SHAREGPT_ROLES, "function_call": "assistant", "observation": "tool", "tool": "tool"}
CHAT_MESSAGE_ROLES = {r: r for r in (*MESSAGE_ROLES, "tool")}
MEDIA_PARTS = ("image", "image_url", "audio", "input_audio", "video", "video_url", "file")
REASONING_PARTS = ("thinking", "reasoning")
SFT_FORMATS = ("text", "alpaca", "prompt_completion", *CHAT_FORMATS)
# Fields of another task's records: an SFT format reading such a record would silently drop what they say.
OTHER_TASK_FIELDS = {
    "label": "task kto with data.format: unpaired (single answers, each marked desirable or undesirable)",
    "kto_tag": "task kto with data.format: unpaired (single answers, each marked desirable or undesirable)",
    "chosen": "task dpo with data.format: preference (chosen / rejected pairs)",
    "rejected": "task dpo with data.format: preference (chosen / rejected pairs)",
}


class Turn(tuple):
    """A chat turn: unpacks as (role, text) like every turn; the tool calls, reasoning and loss override of a
    message ride along (and show in repr, which the preparation cache key hashes)."""

    def __new__(cls, role: str, text: str, calls=(), reasoning: str = "", train: bool | None = None, **extra):
        turn = super().__new__(cls, (role, text))
        turn.calls, turn.reasoning, turn.train = tuple(calls), reasoning, train
        # name / call_id of a tool result, tools of a ("tools", json) turn, where: the field of the reasoning
        turn.name, turn.call_id = extra.get("name"), extra.get("call_id")
        turn.tools, turn.where = extra.get("tools"), extra.get("where", "")
        return turn

    def __getnewargs__(self):  # pickle: the tuple's own would pass the pair as one argument
        return tuple(self)

    def __repr__(self) -> str:
        extra = {k: v for k, v in vars(self).items() if k != "where" and v not in ((), "", None)}
        return f"Turn{tuple(self)!r}{extra if extra else ''}"


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


class RecordReader:
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


def _chat(rec: RecordReader, fmt: str) -> list[tuple[str, str]]:
    if fmt == "sharegpt":
        turns = _chat_turns(rec, "conversations", "from", "value", CHAT_SHAREGPT_ROLES)
        if rec.has("system"):  # LLaMA-Factory's ShareGPT variant keeps the system prompt beside the turns
            turns.insert(0, Turn("system", rec.field("system")))
    else:
        turns = _chat_turns(rec, "messages", "role", "content", CHAT_MESSAGE_ROLES)
    if not any(role == "assistant" for role, _ in turns):
        rec.fail(f"the conversation has no assistant turn: nothing to train on (roles: {', '.join(r for r, _ in turns)})")
    tools = _tools(rec)
    if tools:
        turns.insert(0, Turn("tools", json.dumps(tools, ensure_ascii=False), tools=tools))
    return turns


def _chat_turns(rec: RecordReader, name: str, speaker: str, content: str, roles: dict[str, str]) -> list[Turn]:
    turns = rec.get(name)
    if not isinstance(turns, list) or not turns:
        rec.fail(f"field '{name}' must be a non-empty list of turns, got {type(turns).__name__}")
    return [_chat_turn(rec, t, f"{name}[{j}]", speaker, content, roles) for j, t in enumerate(turns)]


def _chat_turn(rec: RecordReader, t, where: str, speaker: str, content: str, roles: dict[str, str]) -> Turn:
    if not isinstance(t, dict) or speaker not in t or (content not in t and not t.get("tool_calls")):
        got = ", ".join(sorted(t)) if isinstance(t, dict) else type(t).__name__
        rec.fail(f"{where} must have '{speaker}' and '{content}' (got: {got})")
    said = str(t[speaker]).lower()
    role = roles.get(said)
    if role is None:
        rec.fail(f"{where}.{speaker} is '{t[speaker]}'; expected one of {', '.join(sorted(set(roles)))}")
    train = _loss_override(rec, t, where, role)
    if said == "function_call":  # LLaMA-Factory: the call itself, as JSON, is the turn's value
        return Turn(role, "", calls=_calls(rec, t[content], f"{where}.{content}"), train=train)
    calls = _calls(rec, t["tool_calls"], f"{where}.tool_calls") if t.get("tool_calls") else ()
    if calls and role != "assistant":
        rec.fail(f"{where} has tool_calls but role '{role}'; only assistant turns call tools")
    text, reasoning, reasoned_at = _content(rec, t.get(content), f"{where}.{content}", required=not calls)
    for key in ("reasoning_content", "thinking"):
        if t.get(key) is not None:
            reasoning, reasoned_at = rec.text(t[key], f"{where}.{key}"), f"{where}.{key}"
    if reasoning and role != "assistant":
        rec.fail(f"{reasoned_at}: reasoning on a {role} turn; only assistant turns reason")
    return Turn(role, text, calls=calls, reasoning=reasoning, train=train, where=reasoned_at,
                name=t.get("name") if role == "tool" else None, call_id=t.get("tool_call_id"))


def _content(rec: RecordReader, value, where: str, required: bool) -> tuple[str, str, str]:
    """(text, reasoning, field of the reasoning) of a content string or list of content parts."""
    if value is None or isinstance(value, str):
        return rec.text(value, where, required), "", ""
    if not isinstance(value, list):
        rec.fail(f"field '{where}' must be a string or a list of content parts, got {type(value).__name__}")
    texts, reasoning, reasoned_at = [], "", ""
    for j, part in enumerate(value):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PARTS:
            rec.fail(f"{at} is an '{kind}' part: the models trained here read text only; drop the part (or the "
                     "record), or describe it in a text part")
        if kind not in ("text", *REASONING_PARTS):
            rec.fail(f"{at} must be a content part {{\"type\": \"text\", \"text\": ...}} (or thinking / reasoning), "
                     f"got {json.dumps(part, default=str)[:80]}")
        said = next((part[k] for k in ("text", "value", "thinking", "reasoning") if part.get(k) is not None), None)
        if kind == "text":
            texts.append(rec.text(said, at, required=False))
        else:
            reasoning, reasoned_at = rec.text(said, at), at
    text = "".join(texts)
    if required and not text.strip():
        rec.fail(f"field '{where}' has no text")
    return text, reasoning, reasoned_at


def _loss_override(rec: RecordReader, t: dict, where: str, role: str) -> bool | None:
    """A turn's loss_weight (0 or 1) / train (a boolean): None where the turn has neither (its role decides)."""
    weight, flag = t.get("loss_weight"), t.get("train")
    if weight is not None and weight not in (0, 1):
        rec.fail(f"{where}.loss_weight is {weight!r}; expected 0 (masked) or 1 (trained): a turn is trained or "
                 "not, partial weights are not supported")
    if flag is not None and not isinstance(flag, bool):
        rec.fail(f"{where}.train is {flag!r}; expected true or false")
    if weight is not None and flag is not None and bool(weight) != flag:
        rec.fail(f"{where} has loss_weight {weight!r} and train {flag!r}, which disagree; keep one")
    trained = bool(weight) if weight is not None else flag
    if trained and role != "assistant":
        rec.fail(f"{where} asks to train a {role} turn; only assistant turns are trained (data.train_on_prompt: "
                 "true trains every token)")
    return trained


def _drop_nulls(value):
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _json(rec: RecordReader, value, where: str):
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        rec.fail(f"field '{where}' is not valid JSON ({e.msg} at character {e.pos}): {value[:80]!r}")


def _calls(rec: RecordReader, value, where: str) -> tuple[dict, ...]:
    """Tool calls as {"name", "arguments": object} (the shape chat templates render)."""
    value = _json(rec, value, where)
    calls = []
    for j, call in enumerate(value if isinstance(value, list) else [value]):
        at = f"{where}[{j}]" if isinstance(value, list) else where
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            rec.fail(f"{at} must be a tool call {{\"name\": ..., \"arguments\": {{...}}}} (OpenAI's "
                     "{\"type\": \"function\", \"function\": {...}} too)")
        args = _json(rec, fn.get("arguments", {}), f"{at}.arguments")
        if not isinstance(args, dict):
            rec.fail(f"{at}.arguments must be an object (or a JSON string of one), got {type(args).__name__}")
        ids = {"id": call["id"]} if isinstance(call.get("id"), str) else {}  # templates that pair results by id
        calls.append({"name": fn["name"], "arguments": _drop_nulls(args), **ids})
    return tuple(calls)


def _tools(rec: RecordReader) -> list[dict] | None:
    """The record's tool schemas (a JSON string, as LLaMA-Factory stores them, or a list)."""
    value = rec.get("tools", required=False)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    value = _json(rec, value, "tools")
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        rec.fail("field 'tools' must be a list of tool schemas (or a JSON string of one)")
    return [_drop_nulls(t) for t in value] or None


def _other_task(rec: RecordReader, fmt: str, text_field: str) -> None:
    """Refuse fields another task reads: read as SFT, the record would train on what they mark."""
    for name, task in OTHER_TASK_FIELDS.items():
        if rec.has(name) and not (fmt == "text" and name == text_field):
            rec.fail(f"field '{name}' is read by {task}; format '{fmt}' would ignore it and train every record "
                     f"as a good answer: set the task that reads it, or drop '{name}' from the records")


def _answer(rec: RecordReader, name: str) -> str:
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


def _pair(rec: RecordReader) -> Pair:
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
    out, scored = [], False
    for i, raw in enumerate(records):
        rec = RecordReader(raw, i, source, fmt, placeholders or {})
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
        if fmt in SFT_FORMATS:  # after the format's own fields: a file of another layout fails on those first
            _other_task(rec, fmt, text_field)
            scored = scored or rec.has("score")
    if not out:
        raise DataError(f"{source}: no records")
    if scored:
        log.warning("%s: the records' 'score' field is not read: no SFT format trains on a reward or rating "
                    "(filter the records by it before training if it marks bad ones)", source)
    return out
