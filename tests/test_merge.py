"""hf-vram merge: adapters really trained on a tiny base (QLoRA on NF4, DoRA, rsLoRA, added tokens) are merged
into the base reloaded unquantized; the merged model must compute what base + adapter computes.

Tolerances: the merge runs in fp32 here, so merged and base + adapter differ only by the float rounding of
W + s * B @ A against W @ x + s * B @ (A @ x); on this width-64 model that is ~1e-6, and LOGIT_TOL = 1e-4 leaves
room for other CPUs' kernels while staying far below the adapter's effect (> 0.1).
"""

from __future__ import annotations

import json
import shutil

import bitsandbytes as bnb
import pytest
import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, pipeline

from hf_vram.builders.model import keep_4bit_layout_for_training
from hf_vram.errors import UserError
from hf_vram.merge import merge_adapter

from .conftest import run_cli

LOGIT_TOL = 1e-4
CARD_TAGS = ["hf-vram", "lora", "qlora", "4-bit"]
NEW_TOKENS = ["<|im_start|>", "<|im_end|>"]
PROMPTS = ["3 + 4 = ", "What is 2 + 6?", "9 + 0 is"]
TEXTS = [f"{a} + {b} = {a + b}. What is {a} + {b}? {a + b}" for a in range(10) for b in range(10)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Width-64 matmuls gain nothing from a second thread, and a second thread that has to wait for a busy core
    (other test processes) made the same steps 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(tokenizer, chat: bool = False):
    texts = [f"{NEW_TOKENS[0]}{t}{NEW_TOKENS[1]}" if chat else t for t in TEXTS[::7]]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return enc.input_ids, enc.attention_mask, labels


def _train(model, tokenizer, steps: int = 8, chat: bool = False, lr: float = 1e-2) -> list[float]:
    ids, mask, labels = _batch(tokenizer, chat)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0], losses
    return losses


def _save(model, tokenizer, out, base, hf_vram_card: bool = True):
    """The files of an hf-vram adapter output: adapter, tokenizer, recipe.yaml and a card with Hub metadata."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "README.md").unlink()  # peft's own card; hf-vram writes its own or, here, none
    if hf_vram_card:
        recipe = {"model": {"name_or_path": str(base)}, "quant": {"bits": 4}, "adapter": {"type": "lora"}}
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        data = ModelCardData(library_name="peft", base_model="org/tiny-base", datasets=["org/sums"], tags=CARD_TAGS)
        ModelCard(f"---\n{data.to_yaml()}\n---\n\n# tiny\n\nA LoRA adapter.\n").save(out / "README.md")


def _reference(base, adapter_dir):
    """Base reloaded unquantized in fp32 with the adapter loaded on top, the way peft users run it."""
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return PeftModel.from_pretrained(model, adapter_dir).eval()


@torch.no_grad()
def _logits(model, tokenizer, chat: bool = False):
    ids, mask, _ = _batch(tokenizer, chat)
    return model(input_ids=ids, attention_mask=mask).logits.float()


@torch.no_grad()
def _greedy(model, tokenizer, prompts=PROMPTS, new: int = 12) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt").input_ids
        gen = model.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        out.append(gen[0, ids.shape[1]:].tolist())
    return out


def _load(dest):
    return AutoModelForCausalLM.from_pretrained(dest).eval(), AutoTokenizer.from_pretrained(dest)


def _lora(**kw) -> LoraConfig:
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM", **kw)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_merge_adapter_trained_on_nf4_base(tmp_path, tiny_base, variant):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=quant, dtype=torch.float32,
                                                 device_map={"": "cpu"})
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    keep_4bit_layout_for_training(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(1)
    model = get_peft_model(model, _lora(use_dora=variant == "dora"))
    _train(model, tokenizer)
    adapter = tmp_path / "adapter"
    _save(model, tokenizer, adapter, tiny_base)
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert any("lora_B" in k and f.get_tensor(k).abs().max() > 0 for k in f.keys())

    dest = merge_adapter(adapter, None, "float32", "5GB")
    assert dest == adapter / "merged"
    assert (dest / "model.safetensors").is_file() and not (dest / "adapter_config.json").exists()
    merged, merged_tok = _load(dest)
    assert merged.dtype == torch.float32 and not any("lora" in n for n, _ in merged.named_parameters())
    reference = _reference(tiny_base, adapter)
    diff = (_logits(merged, merged_tok) - _logits(reference, tokenizer)).abs().max().item()
    print(f"{variant}: max |logit diff| merged vs base+adapter = {diff:.2e}")
    assert diff < LOGIT_TOL
    assert _greedy(merged, merged_tok) == _greedy(reference, tokenizer)

    plain = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    effect = (_logits(merged, merged_tok) - _logits(plain, tokenizer)).abs().max().item()
    assert effect > 0.1, effect
    assert _greedy(merged, merged_tok) != _greedy(plain, tokenizer)

    card = ModelCard.load(dest / "README.md")
    assert card.data.library_name == "transformers" and card.data.tags == CARD_TAGS + ["merged"]
    assert card.data.base_model == "org/tiny-base" and card.data.datasets == ["org/sums"]
    assert "merged into its base" in card.text and "float32" in card.text and "A LoRA adapter." in card.text
    assert (dest / "recipe.yaml").read_text() == (adapter / "recipe.yaml").read_text()


def _train_chat_adapter(out, base, trainable_tokens: bool = False, **lora_kw):
    """A LoRA adapter trained with two added special tokens, the embeddings resized before get_peft_model."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": NEW_TOKENS})
    new_ids = tokenizer.convert_tokens_to_ids(NEW_TOKENS)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    old_rows = model.get_input_embeddings().weight.shape[0]
    assert len(tokenizer) == old_rows + 2
    model.resize_token_embeddings(len(tokenizer))
    if trainable_tokens:
        lora_kw["trainable_token_indices"] = {"embed_tokens": new_ids}
    torch.manual_seed(2)
    model = get_peft_model(model, _lora(**lora_kw))
    _train(model, tokenizer, chat=True)
    _save(model, tokenizer, out, base, hf_vram_card=False)
    return model, new_ids, old_rows


def _embedding_rows(model, ids):
    """The input-embedding and lm_head rows of ids, as the (possibly peft-wrapped) model computes them."""
    ids = torch.tensor(ids)
    with torch.no_grad():
        inputs = model.get_input_embeddings()(ids)
        hidden = torch.eye(inputs.shape[1])
        outputs = model.get_output_embeddings()(hidden).T[ids]
    return inputs, outputs


@pytest.fixture(scope="module")
def chat_adapter(tmp_path_factory, tiny_base):
    """rsLoRA with trainable_token_indices for the new tokens (peft saves the resized matrices itself)."""
    out = tmp_path_factory.mktemp("chat") / "adapter"
    model, new_ids, old_rows = _train_chat_adapter(out, tiny_base, trainable_tokens=True, use_rslora=True)
    return out, model, new_ids, old_rows


def _check_added_tokens(label, adapter, dest, trained, new_ids, old_rows, base):
    merged, tokenizer = _load(dest)
    assert merged.config.vocab_size == old_rows + 2 == len(tokenizer)
    assert merged.get_input_embeddings().weight.shape[0] == merged.get_output_embeddings().weight.shape[0] == old_rows + 2
    for got, want in zip(_embedding_rows(merged, new_ids), _embedding_rows(trained, new_ids)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    text = f"{NEW_TOKENS[0]}3 + 4 = 7{NEW_TOKENS[1]}"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids[0] == new_ids[0] and ids[-1] == new_ids[1]
    assert tokenizer.decode(ids) == text

    reference = _reference(base, adapter)
    for name, other in [("base+adapter", reference), ("trained in memory", trained)]:
        diff = (_logits(merged, tokenizer, chat=True) - _logits(other, tokenizer, chat=True)).abs().max().item()
        print(f"added tokens, {label}: max |logit diff| merged vs {name} = {diff:.2e}")
        assert diff < LOGIT_TOL
    prompts = [f"{NEW_TOKENS[0]}{p}" for p in PROMPTS]
    assert _greedy(merged, tokenizer, prompts) == _greedy(reference, tokenizer, prompts)


def test_merge_keeps_added_tokens_trainable_token_indices(chat_adapter, tiny_base):
    adapter, trained, new_ids, old_rows = chat_adapter
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        saved = {k: f.get_slice(k).get_shape() for k in f.keys()}
    # peft saved the whole resized matrices because the vocabulary differs from the base's config.
    assert saved["base_model.model.lm_head.weight"] == [old_rows + 2, 64]
    dest = merge_adapter(adapter, None, "float32", "5GB")
    _check_added_tokens("trainable_token_indices", adapter, dest, trained, new_ids, old_rows, tiny_base)


def test_merge_keeps_added_tokens_modules_to_save(tmp_path, tiny_base):
    adapter = tmp_path / "adapter"
    trained, new_ids, old_rows = _train_chat_adapter(adapter, tiny_base, modules_to_save=["embed_tokens", "lm_head"])
    dest = merge_adapter(adapter, None, "auto", "5GB")
    _check_added_tokens("modules_to_save", adapter, dest, trained, new_ids, old_rows, tiny_base)


def test_merge_refuses_added_tokens_whose_embeddings_were_not_saved(chat_adapter, tmp_path):
    _, trained, _, _ = chat_adapter
    out = tmp_path / "no-embeddings"
    trained.save_pretrained(out, save_embedding_layers=False)
    shutil.copy(chat_adapter[0] / "tokenizer.json", out)
    shutil.copy(chat_adapter[0] / "tokenizer_config.json", out)
    with pytest.raises(UserError, match="save_embedding_layers=True"):
        merge_adapter(out)
    assert not (out / "merged").exists()


def test_merge_shards_and_loads_in_pipeline(chat_adapter, tmp_path):
    adapter = chat_adapter[0]
    dest = merge_adapter(adapter, tmp_path / "sharded", "auto", "100KB")
    shards = sorted(p.name for p in dest.glob("model-*-of-*.safetensors"))
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert not (dest / "model.safetensors").exists()
    merged, tokenizer = _load(dest)
    assert merged.dtype == torch.float32  # auto: the base's config says float32
    # No card and no recipe.yaml in the adapter folder: a card is written from adapter_config.json alone.
    card = ModelCard.load(dest / "README.md")
    assert card.data.library_name == "transformers" and "merged" in card.data.tags and "float32" in card.text
    assert not (dest / "recipe.yaml").exists()

    pipe = pipeline("text-generation", model=str(dest))
    out = pipe(PROMPTS[0], max_new_tokens=12, min_new_tokens=12, do_sample=False, return_full_text=False)
    expected = tokenizer.decode(_greedy(merged, tokenizer, PROMPTS[:1])[0], skip_special_tokens=True)
    assert out[0]["generated_text"] == expected and expected.strip()

    # A second merge into the same folder replaces the first (here: one shard instead of several).
    merge_adapter(adapter, dest, "bfloat16", "5GB")
    assert (dest / "model.safetensors").is_file() and not list(dest.glob("model-*-of-*.safetensors"))
    assert AutoModelForCausalLM.from_pretrained(dest).dtype == torch.bfloat16


def test_merge_errors(tmp_path, tiny_base, chat_adapter):
    from peft import AdaptionPromptConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    prompt = get_peft_model(model, AdaptionPromptConfig(adapter_len=4, adapter_layers=1, task_type="CAUSAL_LM"))
    prompt.save_pretrained(tmp_path / "prompt")
    with pytest.raises(UserError, match="ADAPTION_PROMPT cannot be merged.*stays an adapter: load it with peft"):
        merge_adapter(tmp_path / "prompt")

    moved = tmp_path / "moved"
    shutil.copytree(chat_adapter[0], moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone-base")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="gone-base.*not found"):
        merge_adapter(moved)

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an earlier merge"):
        merge_adapter(chat_adapter[0], tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_merge_cli_errors(tmp_path, tiny_base):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli("merge", str(empty))
    assert r.returncode == 2, r.stderr
    assert "not an output" in r.stderr and "hf-vram train" in r.stderr and str(empty) in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("merge", str(tiny_base))
    assert r.returncode == 2, r.stderr
    assert "already a full model" in r.stderr and "nothing to merge" in r.stderr and str(tiny_base) in r.stderr
