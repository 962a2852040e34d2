"""QLoRA on a tiny local base: 4-bit NF4 bitsandbytes layers, LoRA learns, the base stays frozen, and the
saved adapter loads through a plain transformers.pipeline."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import torch
from transformers import pipeline

from hf_vram.cli import main
from hf_vram.generate import greedy_generate
from hf_vram.recipe.load import load_recipe
from hf_vram.runners.run import finish, setup, train

from .conftest import write_recipe


@torch.no_grad()
def _logits(model, ids):
    model.eval()
    return model(input_ids=ids).logits.float()


def _base_logits(model, ids):
    with model.disable_adapter():
        return _logits(model, ids)


def qlora_recipe(base, out, **train):
    return {
        "description": "tiny QLoRA test",
        "model": {"name_or_path": str(base)},
        "quant": {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "float32"},
        "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"source": "builtin:arithmetic", "format": "alpaca", "template": "alpaca-short", "max_length": 64},
        "train": {
            "output_dir": str(out), "micro_batch_size": 8, "max_steps": 25, "lr": 5e-3, "warmup": 0,
            "optimizer": "paged_adamw_8bit", "logging_steps": 1, "save_steps": 100, "report_to": [], **train,
        },
        "eval": {"score_samples": 8, "max_new_tokens": 8},
    }


def test_qlora_run_trains_adapter_on_4bit_base(tmp_path, tiny_base, capsys):
    out = tmp_path / "out"
    run = setup(load_recipe(str(write_recipe(tmp_path, "qlora", qlora_recipe(tiny_base, out)))))
    model = run.model
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # q k v o gate up down in each of the 2 layers
    assert all(m.weight.quant_type == "nf4" and m.weight.quant_state.nested for m in four_bit)
    opt = run.trainer.create_optimizer()  # transformers builds bnb's AdamW with optim_bits=8, is_paged=True
    assert isinstance(opt, bnb.optim.AdamW) and opt.is_paged and opt.args.optim_bits == 8
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    probe = run.tokenizer(["What is 2 + 3?"], return_tensors="pt").input_ids
    base_logits = _base_logits(model, probe)

    summary = finish(run)

    # A random base caps how far a rank-8 adapter can move its logits in 25 steps; the fall is still clear.
    assert summary["final_loss"] < 0.9 * summary["first_loss"], summary
    params = dict(model.named_parameters())
    assert all(not torch.equal(lora[n], params[n].detach()) for n in lora), "every LoRA matrix was trained"
    # The frozen base computes exactly what it computed before (adapter switched off); the adapter does not.
    torch.testing.assert_close(_base_logits(model, probe), base_logits, rtol=0, atol=0)
    assert (_logits(model, probe) - base_logits).abs().max() > 1e-2
    assert {"score_before", "score_after"} <= summary.keys()
    # The output is an adapter (safetensors) with its tokenizer, not a copy of the base.
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_base)
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "qlora" in card
    # transformers.pipeline loads the adapter directory (base + adapter) and generates.
    pipe = pipeline("text-generation", model=str(out))
    gen = pipe("### Instruction:\nWhat is 2 + 3?\n\n### Response:\n", max_new_tokens=8, do_sample=False)
    assert isinstance(gen[0]["generated_text"], str) and len(gen[0]["generated_text"]) > 40
    # `hf-vram generate` wraps a bare prompt in the template the adapter was trained with.
    capsys.readouterr()
    assert main(["generate", str(out), "What is 2 + 3?", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", str(tmp_path), "hi"]) == 2


def test_inference_before_training_leaves_4bit_gradients_intact(tmp_path, tiny_base):
    """Scoring before training (generate in eval mode) must not change the gradients of the next step:
    bitsandbytes' CPU inference repacking did (on CPUs with AVX512-BF16, where it is enabled), until hf-vram
    switched it off for models it trains."""
    run = setup(load_recipe(str(write_recipe(tmp_path, "qlora", qlora_recipe(tiny_base, tmp_path / "out")))))
    model = run.model
    assert all(not m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    batch = run.tokenizer(["What is 2 + 3? The answer is 5."], return_tensors="pt")

    def lora_grads():
        model.train()
        model.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = lora_grads()
    greedy_generate(model, run.tokenizer, ["What is 2 + 3?"], max_new_tokens=4)
    after = lora_grads()
    assert any(g.abs().sum() > 0 for g in before.values())
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_recipe_dependency_is_trained_first(tmp_path):
    """`model.name_or_path: recipe:X` trains X when its output is missing, then fine-tunes its output."""
    from .conftest import scratch_recipe

    base_out, out = tmp_path / "base-out", tmp_path / "out"
    base_recipe = write_recipe(tmp_path, "base", scratch_recipe(base_out, max_steps=5))
    data = qlora_recipe(f"recipe:{base_recipe}", out, max_steps=5)
    data["eval"] = {"score_samples": 0}
    summary = train(load_recipe(str(write_recipe(tmp_path, "ft", data))))
    assert (base_out / "train_summary.json").is_file() and (base_out / "model.safetensors").is_file()
    assert summary["global_step"] == 5
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base_out.resolve())
