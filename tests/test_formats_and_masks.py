"""Every data format loads from real sample data, bad records fail loudly, and loss masks are exact.

Masks are checked by decoding: the trained stretches of a sample must be exactly its answers (each with its
end-of-turn marker), and everything else must be masked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data_prep.chat import CHATML_TOKENS, install_chat_template
from data_prep.formats import Pair, to_examples
from data_prep.prepare import load_examples, prepare_dataset
from data_prep.sources import read_records
from data_prep.tokenize import IGNORE, tokenize_examples
from hf_vram.errors import DataError
from hf_vram.recipe.schema import DataSection
from tests.conftest import SAMPLE_DATA, run_cli, write_recipe

needs_data = pytest.mark.skipif(not SAMPLE_DATA.is_dir(), reason=f"no sample data at {SAMPLE_DATA} (set HF_VRAM_SAMPLE_DATA)")

# A Llama-3-style template, as shipped by chat models: no {% generation %} markers.
LLAMA3_STYLE = (
    "{{ bos_token }}{% for m in messages %}<|start|>{{ m['role'] }}\n\n{{ m['content'] }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n\n{% endif %}"
)


@pytest.fixture()
def tok(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


def stretches(row, tok):
    """Decoded runs of trained and of masked tokens, in order: [(trained, text), ...]."""
    runs = []
    for t, label in zip(row["input_ids"], row["labels"]):
        trained = label != IGNORE
        if trained and label != t:
            raise AssertionError("a trained label differs from its input token")
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(t)
        else:
            runs.append((trained, [t]))
    return [(trained, tok.decode(ids)) for trained, ids in runs]


def trained_texts(row, tok):
    return [text for trained, text in stretches(row, tok) if trained]


def tokenized(records, fmt, tok, **data):
    section = DataSection(source="mem.json", format=fmt, **data)
    examples = to_examples(records, fmt, "mem.json", section.template, section.text_field, section.placeholders)
    if fmt in ("sharegpt", "messages"):
        install_chat_template(tok, section.chat_template)
    return tokenize_examples(examples, tok, section, "mem.json")


# --- formats on the real samples -------------------------------------------------------------------------------


@needs_data
def test_each_sample_file_loads_in_its_format():
    cases = {
        "alpaca_en_demo.json": ("alpaca", 999),
        "identity.json": ("alpaca", 91),
        "sharegpt_dummy_conversation.json": ("sharegpt", 500),
        "dpo_en_demo.json": ("preference", 300),
        "c4_demo.jsonl": ("text", 300),
    }
    for name, (fmt, n) in cases.items():
        examples = to_examples(read_records(str(SAMPLE_DATA / name), fmt), fmt, name, placeholders={"name": "Vram", "author": "us"})
        assert len(examples) == n, name
    sharegpt = to_examples(read_records(str(SAMPLE_DATA / "sharegpt_dummy_conversation.json"), "sharegpt"), "sharegpt", "s")
    assert max(sum(r == "assistant" for r, _ in ex) for ex in sharegpt) >= 2  # multi-turn conversations
    pairs = to_examples(read_records(str(SAMPLE_DATA / "dpo_en_demo.json"), "preference"), "preference", "d")
    assert all(isinstance(p, Pair) and p.prompt[-1][0] == "user" and p.chosen != p.rejected for p in pairs)


@needs_data
def test_identity_placeholders_are_filled():
    path = str(SAMPLE_DATA / "identity.json")
    examples = to_examples(read_records(path, "alpaca"), "alpaca", path, placeholders={"name": "Vram", "author": "the team"})
    answers = [turns[1][1] for turns in examples]
    assert not any("{{" in a for a in answers)
    assert "Hello! I am Vram, an AI assistant developed by the team. How can I assist you today?" in answers


@needs_data
@pytest.mark.parametrize(
    "name, fmt, message",
    [
        ("sharegpt_dummy_conversation.json", "alpaca", "record 0: missing field 'instruction' for format 'alpaca' (the record has: conversations, id)"),
        ("alpaca_en_demo.json", "sharegpt", "record 0: missing field 'conversations'"),
        ("alpaca_en_demo.json", "messages", "record 0: missing field 'messages'"),
        ("dpo_en_demo.json", "alpaca", "record 0: missing field 'instruction'"),
        ("sharegpt_dummy_conversation.json", "preference", "record 0: missing field 'chosen'"),
        ("alpaca_en_demo.json", "prompt_completion", "record 0: missing field 'prompt'"),
    ],
)
def test_a_file_read_in_the_wrong_format_fails_on_its_first_record(name, fmt, message):
    path = str(SAMPLE_DATA / name)
    with pytest.raises(DataError) as e:
        to_examples(read_records(path, fmt), fmt, path)
    assert str(e.value).startswith(f"{path}: {message}")


@pytest.mark.parametrize(
    "record, fmt, message",
    [
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}, "sharegpt",
         "record 0: conversations[1].from is 'robot'; expected one of"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "sharegpt", "record 0: the conversation has no assistant turn"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]}, "sharegpt",
         "record 0: field 'conversations[1].value' is empty"),
        ({"messages": [{"role": "user", "text": "hi"}]}, "messages", "record 0: messages[0] must have 'role' and 'content'"),
        ({"messages": "hi"}, "messages", "record 0: field 'messages' must be a non-empty list of turns"),
        ({"instruction": "a", "output": " "}, "alpaca", "record 0: field 'output' is empty"),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, "preference", "record 0: chosen and rejected are the same text"),
        ({"text": 3}, "text", "record 0: field 'text' must be a string, got int"),
    ],
)
def test_bad_records_are_named(record, fmt, message):
    with pytest.raises(DataError) as e:
        to_examples([record], fmt, "f.jsonl")
    assert str(e.value).startswith(f"f.jsonl: {message}")


def test_local_file_types_load(tmp_path):
    import pandas as pd

    rows = [{"prompt": "Say hi.", "completion": "hi"}, {"prompt": "Say bye.", "completion": "bye"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        path = str(tmp_path / f"d.{suffix}")
        examples = to_examples(read_records(path, "prompt_completion"), "prompt_completion", path)
        assert examples == [[("prompt", "Say hi."), ("completion", "hi")], [("prompt", "Say bye."), ("completion", "bye")]]


# --- exact masks ------------------------------------------------------------------------------------------------


def test_alpaca_trains_the_output_and_eos_only(tok):
    rows, counts = tokenized([{"instruction": "Add 2 and 3.", "input": "", "output": "5"}], "alpaca", tok, template="alpaca-short")
    assert stretches(rows[0], tok) == [(False, "### Instruction:\nAdd 2 and 3.\n\n### Response:\n"), (True, "5</s>")]
    assert counts.trained_tokens == 2 and counts.kept == 1


def test_prompt_completion_trains_the_completion_and_eos(tok):
    rows, _ = tokenized([{"prompt": "Q: 1 + 1 =", "completion": " 2"}], "prompt_completion", tok)
    assert stretches(rows[0], tok) == [(False, "Q: 1 + 1 ="), (True, " 2</s>")]


def test_an_answer_token_that_begins_with_the_prompts_last_space_is_trained(tok):
    rows, _ = tokenized([{"prompt": "Q: 1 + 1 = ", "completion": "2"}], "prompt_completion", tok)
    assert trained_texts(rows[0], tok)[0].endswith("2</s>")  # the token " 2" spans the seam and is trained


def test_masks_are_exact_with_a_sentencepiece_style_tokenizer():
    """Llama-2 / Mistral style (Metaspace: spaces become a prefix mark), unlike the byte-level tokenizers above."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    corpus = ["### Instruction: Add two and three. ### Response: five", "What is one plus one? two"] * 50
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    sp = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    rows, _ = tokenized([{"instruction": "Add two and three.", "output": "five"}], "alpaca", sp, template="alpaca-short")
    trained = [t for t, label in zip(rows[0]["input_ids"], rows[0]["labels"]) if label != IGNORE]
    # After "\n" the answer has no word-start mark, so "five" is spelled fi + ve here.
    assert sp.convert_ids_to_tokens(trained) == ["fi", "ve", "</s>"]


def test_a_template_that_refuses_a_conversation_names_the_record(tok):
    tok.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    bad = {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}
    with pytest.raises(DataError, match="mem.json: record 2: the chat template refuses this conversation.*roles must alternate"):
        tokenized([good, good, bad], "messages", tok)


def test_text_trains_everything_and_eos(tok):
    rows, _ = tokenized([{"text": "one plus one is two"}], "text", tok)
    assert stretches(rows[0], tok) == [(True, "one plus one is two</s>")]


def test_every_assistant_turn_is_trained_in_a_multi_turn_sharegpt_conversation(tok):
    record = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "A model."},
        {"from": "human", "value": "Bye!"}, {"from": "gpt", "value": "Bye."},
    ]}
    rows, _ = tokenized([record], "sharegpt", tok)  # no chat template on this tokenizer: the plain one is supplied
    assert stretches(rows[0], tok) == [
        (False, "<s>Be brief.\n\n### User:\nWho are you?\n\n### Assistant:\n"),
        (True, "A model.</s>"),
        (False, "\n\n### User:\nBye!\n\n### Assistant:\n"),
        (True, "Bye.</s>"),
    ]


def test_an_answer_that_opens_the_conversation_is_context_not_trained(tok):
    record = {"conversations": [{"from": "gpt", "value": "Hi there."}, {"from": "human", "value": "2 + 2?"}, {"from": "gpt", "value": "4"}]}
    rows, _ = tokenized([record], "sharegpt", tok)
    assert trained_texts(rows[0], tok) == ["4</s>"]


def test_chatml_adds_its_tokens_and_trains_each_answer_with_its_end_marker(tok):
    size = len(tok)
    record = {"messages": [
        {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "3 + 3?"}, {"role": "assistant", "content": "6"},
    ]}
    rows, _ = tokenized([record], "messages", tok, chat_template="chatml")
    assert len(tok) == size + 2 and all(t in tok.get_vocab() for t in CHATML_TOKENS)
    assert stretches(rows[0], tok) == [
        (False, "<s><|im_start|>user\n2 + 2?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "4<|im_end|>"),
        (False, "\n<|im_start|>user\n3 + 3?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "6<|im_end|></s>"),  # EOS appended after the last answer
    ]
    assert rows[0]["input_ids"].count(tok.convert_tokens_to_ids("<|im_end|>")) == 4  # one token, not split


def test_a_model_template_without_generation_markers_is_used_as_it_is(tok):
    tok.add_special_tokens({"extra_special_tokens": ["<|start|>", "<|eot|>"]})
    tok.chat_template = LLAMA3_STYLE
    record = {"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "U2"}, {"role": "assistant", "content": "A2"},
    ]}
    rows, _ = tokenized([record], "messages", tok, chat_template="auto")
    assert trained_texts(rows[0], tok) == ["A1<|eot|>", "A2<|eot|></s>"]
    assert stretches(rows[0], tok)[0] == (False, "<s><|start|>system\n\nS<|eot|><|start|>user\n\nU1<|eot|><|start|>assistant\n\n")


def test_a_template_given_in_the_recipe_is_used(tok):
    rows, _ = tokenized([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}], "messages", tok,
                        chat_template="{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                                      "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert stretches(rows[0], tok) == [(False, "<user>Hi<assistant>"), (True, "Yo</s>")]
    with pytest.raises(ValueError, match="expected auto, plain, chatml, or a Jinja chat template"):
        DataSection(source="x.json", chat_template="chatlm")


def test_a_template_that_rewrites_earlier_turns_is_refused_with_the_fix(tok):
    # Renders the last message differently from the others: the prefix changes when a turn is added.
    tok.chat_template = "{% for m in messages %}{% if loop.last %}LAST:{% endif %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match="set data.chat_template: plain or chatml"):
        tokenized([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}], "messages", tok)


def test_train_on_prompt_trains_every_token(tok):
    rows, _ = tokenized([{"instruction": "Add 2 and 3.", "output": "5"}], "alpaca", tok, template="alpaca-short", train_on_prompt=True)
    assert all(label == t for t, label in zip(rows[0]["input_ids"], rows[0]["labels"]))


def test_samples_truncated_before_their_answer_are_dropped_and_counted(tok):
    records = [
        {"instruction": "Add 2 and 3.", "output": "5"},
        {"instruction": "Add two numbers. " * 20, "output": "5"},
    ]
    rows, counts = tokenized(records, "alpaca", tok, template="alpaca-short", max_length=48)
    assert len(rows) == 1 and counts.as_dict() == {
        "samples": 2, "kept": 1, "truncated": 1, "dropped": 1, "tokens": len(rows[0]["input_ids"]), "trained_tokens": 2,
    }


# --- preparation: held-out split, cache, CLI ----------------------------------------------------------------------


@needs_data
def test_preparation_is_cached_and_keyed_by_what_it_depends_on(tok, tmp_path):
    data = DataSection(source=str(SAMPLE_DATA / "sharegpt_dummy_conversation.json"), format="sharegpt", max_length=256, val_size=0.1)
    examples = load_examples(data, seed=1)
    assert (len(examples.train), len(examples.eval)) == (450, 50)
    install_chat_template(tok, "auto")
    first = prepare_dataset(examples, tok, data, tmp_path)
    again = prepare_dataset(examples, tok, data, tmp_path)
    assert again.cache_dir == first.cache_dir and again.counts == first.counts
    assert again.train["input_ids"] == first.train["input_ids"] and len(again.eval) == 50
    shorter = prepare_dataset(examples, tok, data.model_copy(update={"max_length": 128}), tmp_path)
    assert shorter.cache_dir != first.cache_dir and shorter.counts["train"]["truncated"] > first.counts["train"]["truncated"]
    # Changed data under the same name (an edited file, a dataset folder, a new Hub revision) is not served stale.
    examples.train[0] = [("user", "Edited question?"), ("assistant", "Edited answer.")]
    edited = prepare_dataset(examples, tok, data, tmp_path)
    assert edited.cache_dir != first.cache_dir and edited.train[0]["input_ids"] != first.train[0]["input_ids"]


def test_a_local_file_has_no_other_split(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completion": "c"}))
    data = DataSection(source=str(path), format="prompt_completion", eval_split="test")
    with pytest.raises(DataError, match=f"{path}: a local file has one split, so split 'test'.*data.val_size"):
        load_examples(data, seed=0)


@needs_data
def test_prepare_cli_inspects_masks_and_refuses_a_wrong_format(tiny_base, tmp_path):
    source = str(SAMPLE_DATA / "sharegpt_dummy_conversation.json")
    recipe = {
        "model": {"name_or_path": str(tiny_base)},
        "adapter": {"type": "lora"},
        "data": {"source": source, "format": "sharegpt", "max_length": 256},
        "train": {"output_dir": str(tmp_path / "out")},
    }
    path = write_recipe(tmp_path, "chat", recipe)
    r = run_cli("prepare", str(path), "--inspect", "2")
    assert r.returncode == 0, r.stderr
    assert "train: samples 500, kept 500" in r.stdout and "trained tokens between [[ ]]" in r.stdout
    assert "### Assistant:\n[[I am Vicuna" in r.stdout
    assert Path(r.stdout.split("cached in ")[1].split()[0]).is_dir()

    r = run_cli("prepare", str(path), "data.format=alpaca")
    assert r.returncode == 2
    assert f"{source}: record 0: missing field 'instruction' for format 'alpaca'" in r.stderr


@needs_data
def test_a_dataset_folder_loads_through_load_dataset_with_its_splits(tmp_path):
    """Sources that are not files go to datasets.load_dataset as they are (Hub ids, dataset folders): the same
    call, offline, on a folder with one file per split."""
    chats = json.loads((SAMPLE_DATA / "sharegpt_dummy_conversation.json").read_text())
    folder = tmp_path / "chats"
    folder.mkdir()
    for split, part in (("train", chats[:40]), ("test", chats[40:50])):
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(c) for c in part))
    data = DataSection(source=str(folder), format="sharegpt", eval_split="test")
    examples = load_examples(data, seed=0)
    assert (len(examples.train), len(examples.eval)) == (40, 10)
    with pytest.raises(DataError, match=f"cannot load dataset '{folder}' split 'validation'"):
        load_examples(data.model_copy(update={"eval_split": "validation"}), seed=0)


def test_packed_text_keeps_long_documents_whole_for_the_packer(tok):
    long_doc = [{"text": "one plus one is two. " * 40}]
    rows, counts = tokenized(long_doc, "text", tok, max_length=32, packing=True)
    assert len(rows[0]["input_ids"]) > 32 and counts.truncated == 0  # trl's bfd_split packer splits it
    rows, counts = tokenized(long_doc, "text", tok, max_length=32, packing=False)
    assert len(rows[0]["input_ids"]) == 32 and counts.truncated == 1
