"""The shipped fine-tuning recipes, each as its tiny variant: the same recipe file with the model overridden by a
tiny local random Llama and the data by a real sample in the recipe's own format. Each trains on CPU with
falling loss and its output loads in a stock pipeline; DPO widens the chosen-vs-rejected reward margin."""

from __future__ import annotations

import json

import pytest

from hf_vram.generate import pipeline_generate
from hf_vram.recipe.load import find_recipe, load_recipe
from hf_vram.runners.run import finish, setup, train

from .conftest import SAMPLE_DATA

pytestmark = pytest.mark.skipif(not SAMPLE_DATA.is_dir(), reason=f"no sample data at {SAMPLE_DATA} (set HF_VRAM_SAMPLE_DATA)")

SFT_RECIPES = [
    "llama7b-qlora-alpaca",
    "llama7b-qlora-sharegpt",
    "mistral7b-qlora-alpaca",
    "openllama3b-qlora-sharegpt",
    "llama3-8b-qlora-chat",
    "qwen2.5-7b-qlora-chat",
    "llama7b-llama-adapter-alpaca",
]


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> dict[str, str]:
    """A real sample file per format; the messages file is the ShareGPT sample laid out as role/content."""
    folder = tmp_path_factory.mktemp("samples")
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    chats = json.loads((SAMPLE_DATA / "sharegpt_dummy_conversation.json").read_text())
    with open(folder / "messages.jsonl", "w") as f:
        for c in chats:
            f.write(json.dumps({"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in c["conversations"]]}) + "\n")
    return {
        # LLaMA-Factory's identity set: a tiny model can learn who it is in a few dozen steps, where the
        # open-ended Alpaca answers exceed what a 64-wide model learns (measured: held-out loss -1% in 48 steps).
        "alpaca": str(SAMPLE_DATA / "identity.json"),
        "sharegpt": str(SAMPLE_DATA / "sharegpt_dummy_conversation.json"),
        "messages": str(folder / "messages.jsonl"),
        "preference": str(SAMPLE_DATA / "dpo_en_demo.json"),
    }


def tiny_variant(name: str, base, source: str, out, **extra):
    overrides = {
        "model.name_or_path": str(base),
        "data.source": source,
        "data.split": "train",
        "data.eval_split": None,
        "data.val_size": 0.1,
        "data.max_samples": 64,
        "data.max_length": 384,  # the tiny tokenizer spells English almost by the character
        "train.output_dir": str(out),
        "train.micro_batch_size": 8,
        "train.grad_accum": 1,
        "train.max_steps": 48,
        "train.lr": 1e-2,
        "train.warmup": 0,
        "train.logging_steps": 1,
        "train.save_steps": 100,
        "train.eval_steps": None,
        "train.report_to": [],
        **extra,
    }
    args = [f"{k}={json.dumps(v) if v is None or isinstance(v, (list, dict)) else v}" for k, v in overrides.items()]
    return load_recipe(str(find_recipe(name)), args)


@pytest.mark.parametrize("name", SFT_RECIPES)
def test_tiny_variant_of_the_recipe_trains_and_loads(name, tiny_english_base, samples, tmp_path):
    shipped = load_recipe(str(find_recipe(name))).recipe
    # LLaMA-Adapter's zero-init gates open slowly: its tiny variant takes a larger step.
    extra = {"train.lr": 5e-2} if shipped.adapter.type == "llama-adapter" else {}
    if shipped.data.format == "alpaca":
        extra["data.placeholders"] = {"name": "Vram", "author": "the hf-vram team"}
    loaded = tiny_variant(name, tiny_english_base, samples[shipped.data.format], tmp_path / "out", **extra)
    recipe = loaded.recipe
    # What makes the recipe what it is survives the shrinking.
    assert (recipe.quant, recipe.adapter, recipe.data.format, recipe.data.chat_template, recipe.data.template) == (
        shipped.quant, shipped.adapter, shipped.data.format, shipped.data.chat_template, shipped.data.template
    )

    run = setup(loaded)
    summary = finish(run)

    # A random base on real English moves slowly under an adapter: single-batch losses are noisy, so the first
    # and last five steps are compared, and the held-out loss before and after training.
    losses = [e["loss"] for e in run.trainer.state.log_history if "loss" in e]
    print(name, "train loss", sum(losses[:5]) / 5, "->", sum(losses[-5:]) / 5, "held-out", summary["eval_before"]["eval_loss"], "->", summary["eval_loss"])
    assert sum(losses[-5:]) < 0.95 * sum(losses[:5]), losses
    assert summary["eval_loss"] < 0.97 * summary["eval_before"]["eval_loss"], summary
    assert summary["eval_perplexity"] > 1
    assert summary["data"]["train"]["kept"] > 0 and summary["data"]["eval"]["samples"] > 0
    out = loaded.output_dir
    assert (out / "adapter_config.json").is_file() and (out / "README.md").is_file()
    # A stock pipeline loads the output; chat outputs get their prompt through the saved chat template.
    (text,) = pipeline_generate(out, ["Who are you?"], max_new_tokens=4)
    assert isinstance(text, str)
    # The model card's usage snippet runs as written.
    snippet = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    exec(compile(snippet, "README.md", "exec"), {})
    if shipped.data.format in ("sharegpt", "messages"):
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(out).chat_template


def test_dpo_recipe_widens_the_reward_margin(tiny_english_base, samples, tmp_path):
    loaded = tiny_variant(
        "mistral7b-qlora-dpo", tiny_english_base, samples["preference"], tmp_path / "out",
        **{"data.max_samples": 40, "data.val_size": 0.2, "data.max_length": 192, "train.max_steps": 16, "train.lr": 2e-3},
    )
    run = setup(loaded)
    summary = finish(run)
    log = [e for e in run.trainer.state.log_history if "rewards/margins" in e]
    margins = [e["rewards/margins"] for e in log]
    accuracies = [e["rewards/accuracies"] for e in log]
    print("dpo margins", [round(m, 3) for m in margins], "held-out", summary.get("eval_rewards/margins"))
    # The policy starts equal to its reference (the base with the adapter off): margin 0 at the first step,
    # then chosen answers gain log-probability over rejected ones on the batches trained.
    assert margins[0] == 0
    assert sum(margins[-4:]) / 4 > 0.05 and sum(accuracies[-4:]) / 4 > 0.5, log[-4:]
    assert "eval_rewards/margins" in summary and "eval_loss" in summary
    out = loaded.output_dir
    # One adapter is saved: the reference is the base with the adapter disabled, not a second copy.
    assert (out / "adapter_config.json").is_file() and not (out / "ref").exists()
    assert "dpo" in (out / "README.md").read_text()


def test_chatml_tokens_survive_training_loading_and_merging(tiny_english_base, samples, tmp_path):
    """A chat template whose tokens the base lacks: the vocabulary grows, the new rows train and are saved with
    the adapter, the adapter loads in a pipeline, and the merged model answers exactly as base + adapter."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_vram.generate import load_pipeline
    from hf_vram.merge import merge_adapter

    loaded = tiny_variant("llama7b-qlora-sharegpt", tiny_english_base, samples["sharegpt"], tmp_path / "out",
                          **{"data.chat_template": "chatml", "train.max_steps": 24})
    summary = train(loaded)
    out = loaded.output_dir
    base_vocab = len(AutoTokenizer.from_pretrained(tiny_english_base))
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == base_vocab + 2 and "<|im_start|>" in tok.chat_template
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys() if "token_adapter" in k}
    for layer in ("model.model.embed_tokens", "model.lm_head"):  # this Llama's output layer is untied
        rows = saved[f"base_model.{layer}.token_adapter.base_layer.weight"]
        assert rows.shape[0] == base_vocab + 2, "the resized layer is saved whole with the adapter"
        # peft starts the trainable rows as a copy of the resized ones: training moved them.
        trained = saved[f"base_model.{layer}.token_adapter.trainable_tokens_delta"]
        assert (trained - rows[base_vocab:]).abs().max() > 1e-3, layer
    assert summary["eval_loss"] < summary["eval_before"]["eval_loss"]

    messages = [{"role": "user", "content": "Who are you?"}]
    adapter_text = load_pipeline(out)(messages, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]["content"]
    merged = merge_adapter(out, dtype="float32")
    merged_text = load_pipeline(merged)(messages, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]["content"]
    assert merged_text == adapter_text and adapter_text.strip()
    # `hf-vram generate` wraps a bare prompt as a user message, for the adapter and for the merged model alike.
    assert pipeline_generate(out, ["Who are you?"], 12) == pipeline_generate(merged, ["Who are you?"], 12) == [adapter_text]
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.get_input_embeddings().weight.shape[0] == base_vocab + 2
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids[0].tolist()
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


# Qwen2.5-Instruct's template, without its tool-calling branches: a default system prompt, <|im_start|> turns, and
# no {% generation %} markers, as chat models ship it.
QWEN_STYLE_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_instruct_base(tiny_english_base, tmp_path_factory):
    """The tiny base dressed as an instruct model: ChatML tokens in its vocabulary and a Qwen-style template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("instruct-base")
    tok = AutoTokenizer.from_pretrained(tiny_english_base)
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN_STYLE_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny_english_base)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_chat_recipe_trains_with_the_models_own_template(tiny_instruct_base, samples, tmp_path):
    """chat_template: auto on a model that ships a template: it is used as it is, every answer is trained up to
    the template's <|im_end|>, and the saved tokenizer keeps the model's template."""
    from transformers import AutoTokenizer

    loaded = tiny_variant("qwen2.5-7b-qlora-chat", tiny_instruct_base, samples["messages"], tmp_path / "out",
                          **{"train.eval_steps": 12})
    run = setup(loaded)
    im_end = run.tokenizer.convert_tokens_to_ids("<|im_end|>")
    row = run.trainer.train_dataset[0]
    trained = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert trained.count(im_end) >= 1 and run.tokenizer.decode(row["input_ids"][:12]).startswith("<|im_start|>system\nYou are")
    assert len(run.tokenizer) == len(AutoTokenizer.from_pretrained(tiny_instruct_base))  # no tokens added
    summary = finish(run)
    assert summary["eval_loss"] < summary["eval_before"]["eval_loss"]
    # Held-out loss and perplexity during training too, every train.eval_steps (12, 24, 36, 48).
    evals = [(e["step"], e["eval_loss"]) for e in run.trainer.state.log_history if "eval_loss" in e]
    assert [step for step, _ in evals if step > 0][:4] == [12, 24, 36, 48], evals
    assert sum("eval_perplexity" in e for e in run.trainer.state.log_history) >= 5  # before, 4 during, end
    assert AutoTokenizer.from_pretrained(loaded.output_dir).chat_template == QWEN_STYLE_TEMPLATE
    (text,) = pipeline_generate(loaded.output_dir, ["Who are you?"], max_new_tokens=6)
    assert isinstance(text, str)
