"""Tool calls, content parts, per-turn loss overrides and fields of other tasks: exact masks on known examples.

Masks are checked by decoding, as in test_formats_and_masks.py: the trained stretches must be exactly the
assistant's output (its calls included, with the end-of-turn marker), and tool results and prompts masked.
"""

from __future__ import annotations

import json
import logging

import pytest
from transformers import AutoTokenizer

from data_prep.formats import Turn, to_examples
from data_prep.sources import read_records
from hf_vram.errors import DataError
from tests.conftest import write_recipe
from tests.test_formats_and_masks import stretches, tokenized

ADD_TOOL = {"name": "add", "description": "Add two numbers",
            "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}
TOOLS_BLOCK = ("# Tools\n\nYou may call one or more functions. Their signatures are within <tools></tools>:\n"
               f"<tools>\n{json.dumps(ADD_TOOL)}\n</tools>")
CALL = '{"name": "add", "arguments": {"a": 2, "b": 3}}'

# A model-style template that reads tools, tool_calls, tool results and reasoning_content (as Qwen's do).
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTOOLS:{% for t in tools %}{{ t['name'] }};{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|im_start|>tool {{ m['tool_call_id'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['reasoning_content'] %}<think>{{ m['reasoning_content'] }}</think>{% endif %}{{ m['content'] }}"
    "{% for c in m['tool_calls'] or [] %}<call>{{ c['function']['name'] }}{{ c['function']['arguments'] | tojson }}</call>{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture()
def tok(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


def user(text, **extra):
    return {"role": "user", "content": text, **extra}


def assistant(content, **extra):
    return {"role": "assistant", "content": content, **extra}


def openai_call(arguments):
    return [{"type": "function", "function": {"name": "add", "arguments": arguments}}]


# --- tool calls ----------------------------------------------------------------------------------------------------


def test_sharegpt_function_call_is_trained_and_observation_masked_in_the_plain_layout(tok):
    record = {"tools": json.dumps([ADD_TOOL]), "conversations": [
        {"from": "human", "value": "2 + 3?"}, {"from": "function_call", "value": CALL},
        {"from": "observation", "value": "5"}, {"from": "gpt", "value": "It is 5."},
    ]}
    rows, _ = tokenized([record], "sharegpt", tok)  # no template on the tokenizer: plain, which knows no tools
    assert stretches(rows[0], tok) == [
        (False, f"<s>{TOOLS_BLOCK}\n\n### User:\n2 + 3?\n\n### Assistant:\n"),
        (True, f"<tool_call>{CALL}</tool_call></s>"),
        (False, "\n\n### User:\n<tool_response>5</tool_response>\n\n### Assistant:\n"),
        (True, "It is 5.</s>"),
    ]


@pytest.mark.parametrize("arguments", ['{"a": 2, "b": 3}', {"a": 2, "b": 3}])
def test_openai_tool_calls_with_string_or_object_arguments_in_chatml(tok, arguments):
    record = {"tools": [ADD_TOOL], "messages": [
        {"role": "system", "content": "Be exact."}, user("2 + 3?"),
        {"role": "assistant", "content": None, "tool_calls": openai_call(arguments)},
        {"role": "tool", "tool_call_id": "c1", "name": "add", "content": "5"},
        {"role": "tool", "tool_call_id": "c2", "name": "add", "content": "5"},
        assistant("5"),
    ]}
    rows, _ = tokenized([record], "messages", tok, chat_template="chatml")
    assert stretches(rows[0], tok) == [
        (False, f"<s><|im_start|>system\nBe exact.\n\n{TOOLS_BLOCK}<|im_end|>\n<|im_start|>user\n2 + 3?<|im_end|>\n"
                "<|im_start|>assistant\n"),
        (True, f"<tool_call>{CALL}</tool_call><|im_end|>"),
        # Results in a row share one user turn, as Hermes / Qwen2.5 lay them out.
        (False, "\n<|im_start|>user\n<tool_response>5</tool_response>\n<tool_response>5</tool_response><|im_end|>\n"
                "<|im_start|>assistant\n"),
        (True, "5<|im_end|></s>"),
    ]


def test_a_template_that_reads_tools_gets_them_through_apply_chat_template(tok):
    record = {"tools": [ADD_TOOL], "messages": [
        user("2 + 3?"), assistant("Adding.", tool_calls=openai_call('{"a": 2, "b": 3}')),
        {"role": "tool", "tool_call_id": "c1", "content": "5"}, assistant("5"),
    ]}
    rows, _ = tokenized([record], "messages", tok, chat_template=TOOL_TEMPLATE)
    assert stretches(rows[0], tok) == [
        (False, "<|im_start|>system\nTOOLS:add;<|im_end|>\n<|im_start|>user\n2 + 3?<|im_end|>\n<|im_start|>assistant\n"),
        (True, 'Adding.<call>add{"a": 2, "b": 3}</call><|im_end|>'),
        (False, "\n<|im_start|>tool c1\n5<|im_end|>\n<|im_start|>assistant\n"),
        (True, "5<|im_end|></s>"),
    ]


def test_tool_fields_that_do_not_fit_are_named():
    def fails(record, message):
        with pytest.raises(DataError, match=message):
            to_examples([record], "messages", "t.jsonl")

    fails({"messages": [user("a"), assistant(None, tool_calls=openai_call("{a: 1"))]},
          r"record 0: field 'messages\[1\].tool_calls\[0\].arguments' is not valid JSON")
    fails({"messages": [user("a"), assistant(None, tool_calls=[{"function": {"arguments": "{}"}}])]},
          r"messages\[1\].tool_calls\[0\] must be a tool call")
    fails({"tools": "{not json", "messages": [user("a"), assistant("b")]}, r"field 'tools' is not valid JSON")
    fails({"messages": [user("a", tool_calls=openai_call("{}")), assistant("b")]}, "only assistant turns call tools")


def test_nulls_arrow_adds_to_tool_arguments_and_schemas_are_dropped(tmp_path):
    path = tmp_path / "calls.jsonl"
    other = {"name": "neg", "parameters": {"type": "object", "properties": {"x": {"type": "number"}}}}
    records = [
        {"tools": [ADD_TOOL], "messages": [user("2 + 3?"), assistant(None, tool_calls=[{"id": "c1", **openai_call({"a": 2, "b": 3})[0]}])]},
        {"tools": [other], "messages": [user("-4?"), assistant(None, tool_calls=[
            {"type": "function", "function": {"name": "neg", "arguments": {"x": 4}}}])]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records))
    examples = to_examples(read_records(str(path), "messages"), "messages", str(path))
    assert examples[0][0].tools == [ADD_TOOL] and examples[1][0].tools == [other]
    assert examples[1][2].calls == ({"name": "neg", "arguments": {"x": 4}},)
    assert examples[0][2].calls == ({"name": "add", "arguments": {"a": 2, "b": 3}, "id": "c1"},)


# --- content parts and reasoning -----------------------------------------------------------------------------------


def test_text_parts_are_joined_and_a_thinking_part_is_trained_where_the_template_renders_it(tok):
    record = {"messages": [
        user([{"type": "text", "text": "2 + "}, {"type": "text", "value": "3?"}]),
        assistant([{"type": "thinking", "thinking": "2 plus 3"}, {"type": "text", "text": "5"}]),
    ]}
    rows, _ = tokenized([record], "messages", tok, chat_template=TOOL_TEMPLATE)
    assert stretches(rows[0], tok) == [
        (False, "<|im_start|>user\n2 + 3?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "<think>2 plus 3</think>5<|im_end|></s>"),
    ]
    same = {"messages": [user("2 + 3?"), assistant("5", reasoning_content="2 plus 3")]}
    rows_again, _ = tokenized([same], "messages", tok, chat_template=TOOL_TEMPLATE)
    assert rows_again[0]["input_ids"] == rows[0]["input_ids"]


def test_reasoning_is_refused_by_a_template_that_does_not_render_it(tok):
    record = {"messages": [user("2 + 3?"), assistant("5", reasoning_content="2 plus 3")]}
    with pytest.raises(DataError) as e:
        tokenized([record], "messages", tok, chat_template="chatml")
    message = str(e.value)
    assert message.startswith("mem.json: record 0: field 'messages[1].reasoning_content' holds reasoning")
    assert "does not render" in message and "drop the field" in message and "data.chat_template" in message


@pytest.mark.parametrize("kind", ["image", "image_url", "audio", "input_audio", "video"])
def test_media_parts_are_refused_as_the_model_reads_text_only(kind):
    record = {"messages": [user([{"type": "text", "text": "What is this?"}, {"type": kind, kind: "x.png"}]), assistant("A cat.")]}
    with pytest.raises(DataError, match=rf"record 0: messages\[0\].content\[1\] is an '{kind}' part: .* read text only"):
        to_examples([record], "messages", "m.jsonl")


# --- per-turn loss overrides ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("override", [{"loss_weight": 0}, {"loss_weight": 0.0}, {"train": False}])
def test_an_assistant_turn_with_loss_weight_0_is_context(tok, override):
    record = {"messages": [user("1 + 1?"), assistant("3", **override), user("Again?"), assistant("2", loss_weight=1)]}
    rows, _ = tokenized([record], "messages", tok, chat_template="chatml")
    assert stretches(rows[0], tok) == [
        (False, "<s><|im_start|>user\n1 + 1?<|im_end|>\n<|im_start|>assistant\n3<|im_end|>\n<|im_start|>user\n"
                "Again?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "2<|im_end|></s>"),
    ]


@pytest.mark.parametrize("record, message", [
    ({"messages": [user("a", loss_weight=1), assistant("b")]},
     r"messages\[0\] asks to train a user turn; only assistant turns are trained \(data.train_on_prompt"),
    ({"messages": [user("a"), assistant("b", loss_weight=0.5)]}, r"messages\[1\].loss_weight is 0.5; expected 0 .* or 1"),
    ({"messages": [user("a"), assistant("b", train="no")]}, r"messages\[1\].train is 'no'; expected true or false"),
    ({"messages": [user("a"), assistant("b", train=True, loss_weight=0)]}, r"messages\[1\] has loss_weight 0 and train True, which disagree"),
])
def test_loss_overrides_that_cannot_be_honoured_are_refused(record, message):
    with pytest.raises(DataError, match=f"m.jsonl: record 0: {message}"):
        to_examples([record], "messages", "m.jsonl")


# --- fields of other tasks -----------------------------------------------------------------------------------------


def test_a_messages_file_with_a_boolean_label_is_refused_naming_label_and_task_kto(tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [user("2 + 2?"), assistant(a)], "label": ok})
                              for a, ok in (("4", True), ("5", False))))
    with pytest.raises(DataError) as e:
        to_examples(read_records(str(path), "messages"), "messages", str(path))
    assert str(e.value).startswith(f"{path}: record 0: field 'label' is read by task kto")
    assert "format 'messages' would ignore it" in str(e.value)


@pytest.mark.parametrize("record, fmt, field, task", [
    ({"instruction": "a", "output": "b", "kto_tag": False}, "alpaca", "kto_tag", "task kto"),
    ({"prompt": "a", "completion": "b", "chosen": "b", "rejected": "c"}, "prompt_completion", "chosen", "task dpo"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "rejected": "c"}, "sharegpt",
     "rejected", "task dpo"),
    ({"text": "a", "label": 1}, "text", "label", "task kto"),
])
def test_other_tasks_fields_are_refused_in_every_sft_format(record, fmt, field, task):
    with pytest.raises(DataError, match=f"record 0: field '{field}' is read by {task}"):
        to_examples([record], fmt, "f.jsonl")


def test_a_score_is_reported_not_read(caplog):
    with caplog.at_level(logging.WARNING, logger="data_prep.formats"):
        examples = to_examples([{"text": "a", "score": 4.5}], "text", "s.jsonl")
    assert examples == [[("text", "a")]]
    assert "'score' field is not read: no SFT format trains on a reward or rating" in caplog.text


def test_turns_keep_their_extras_through_pickle_and_in_repr():
    import pickle

    turn = Turn("assistant", "", calls=[{"name": "add", "arguments": {}}], train=False)
    again = pickle.loads(pickle.dumps(turn))
    assert again == ("assistant", "") and again.calls == turn.calls and again.train is False
    assert "calls" in repr(turn) and repr(Turn("user", "hi")) == "Turn('user', 'hi')"


# --- prepare --inspect ---------------------------------------------------------------------------------------------


def test_prepare_inspect_marks_tool_calls_trained_and_results_masked(tiny_base, tmp_path, capsys):
    from hf_vram.cli import main

    path = tmp_path / "tools.jsonl"
    records = [
        {"tools": [{"name": "add"}], "messages": [
            user([{"type": "text", "text": "2 + 3?"}]), assistant(None, tool_calls=openai_call('{"a": 2, "b": 3}')),
            {"role": "tool", "content": "5"}, assistant("5"), user("And 1 + 1?"), assistant("3", loss_weight=0),
        ]},
        {"messages": [user("1 + 1?"), assistant("2")]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records))
    recipe = {
        "model": {"name_or_path": str(tiny_base)},
        "adapter": {"type": "lora"},
        "data": {"source": str(path), "format": "messages", "max_length": 1024, "chat_template": "chatml"},
        "train": {"output_dir": str(tmp_path / "out")},
    }
    assert main(["prepare", str(write_recipe(tmp_path, "tools", recipe)), "--inspect", "2"]) == 0
    out = capsys.readouterr().out
    assert "train: samples 2, kept 2" in out and "trained tokens between [[ ]]" in out
    assert f"<|im_start|>assistant\n[[<tool_call>{CALL}</tool_call><|im_end|>]]\n" in out
    assert "<|im_start|>user\n<tool_response>5</tool_response><|im_end|>\n<|im_start|>assistant\n[[5<|im_end|>]]" in out
    assert "<|im_start|>assistant\n3<|im_end|>" in out  # loss_weight 0: shown, not trained
    assert "[[2<|im_end|></s>]]" in out
    assert '<tools>\n{"name": "add"}\n</tools>' in out
