"""The BitNet b1.58 recipe through the runner: ternary training layers, the two-stage schedule, the packed export
that stock transformers loads, and the plan's answer for the 3B recipe."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline
from transformers.integrations.bitnet import AutoBitLinear, BitLinear

from hf_vram.recipe.load import load_recipe
from hf_vram.runners.run import finish, setup

from .conftest import run_cli


@pytest.fixture(autouse=True)
def eager():
    # transformers compiles its BitNet quantisers with torch.compile: seconds per shape on a CPU, same numbers.
    with torch.compiler.set_stance("force_eager"):
        yield


def test_bitnet_tiny_recipe_trains_ternary_with_two_stage_schedule_and_exports_packed(tmp_path):
    out = tmp_path / "bitnet"
    steps = 50  # the loss halves by about step 40 on every loss path (fp32 rounding moves it a little): margin
    loaded = load_recipe("bitnet-b158-tiny", [
        f"train.output_dir={out}", f"train.max_steps={steps}", "train.logging_steps=1", "train.save_steps=100",
        "model.config.hidden_size=64", "model.config.intermediate_size=128", "model.config.num_hidden_layers=2",
        "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2", "tokenizer.vocab_size=300",
        "data.max_samples=1000", "eval.sample_prompts=[]",
    ])
    run = setup(loaded)
    blocks = [m for m in run.model.modules() if isinstance(m, AutoBitLinear)]
    assert len(blocks) == 2 * 7 and not isinstance(run.model.lm_head, AutoBitLinear)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}

    summary = finish(run)

    assert summary["final_loss"] < 0.5 * summary["first_loss"], summary
    assert all(not torch.equal(before[n], p.detach()) for n, p in run.model.named_parameters())
    # Two stages: the learning rate drops at mid-training (to 0.3 of the peak's cosine), weight decay ends at 0.
    lrs = [e["learning_rate"] for e in run.trainer.state.log_history if "learning_rate" in e]
    drops = [i for i, (a, b) in enumerate(zip(lrs, lrs[1:])) if b < 0.7 * a]  # the cosine's tail drops fast too
    assert abs(drops[0] - steps // 2) <= 1 and lrs[drops[0] + 1] < 0.6 * lrs[drops[0]], lrs
    assert all(g["weight_decay"] == 0.0 for g in run.trainer.optimizer.param_groups)
    shares = summary["ternary_fraction"]
    assert abs(sum(shares.values()) - 1) < 1e-6 and min(shares.values()) > 0.15
    # The packed export loads as transformers' BitNet with BitLinear layers and computes the trained model's logits.
    packed = AutoModelForCausalLM.from_pretrained(out / "packed")
    assert any(isinstance(m, BitLinear) for m in packed.modules())
    ids = run.tokenizer("3 + 4 = 7", return_tensors="pt").input_ids
    with torch.no_grad():
        trained, exported = run.model.eval()(ids).logits, packed(ids).logits
    assert (trained - exported).abs().max() < 2e-3 * trained.abs().max()
    assert torch.equal(trained.argmax(-1), exported.argmax(-1))
    text = pipeline("text-generation", model=str(out / "packed"))("3 + 4 =", max_new_tokens=3, do_sample=False)
    assert text[0]["generated_text"].startswith("3 + 4 =")


def test_plan_says_whether_the_3b_bitnet_trains_in_12_gb():
    out = run_cli("plan", "bitnet-b158-3b")
    assert out.returncode == 1 and "does NOT fit" in out.stdout, out.stdout + out.stderr
    assert "packed export for inference" in out.stdout
