"""Mixtral assembly from dense models (hf_vram.moe): tiny Llamas built and trained here, assembled, reloaded.

- Four copies of one dense model make a Mixtral that computes exactly what the dense model does: every expert
  runs the same MLP and the router's top-k weights are renormalised to sum to 1, so the routing cannot matter.
  Only float rounding differs (summing the same MLP output scaled by weights that add up to 1), ~1e-6 here;
  LOGIT_TOL = 1e-4 leaves room for other CPUs' kernels while staying far below the logits' spread (~1).
- Four experts trained on four kinds of text from one trained base: gate_mode hidden must route held-out text of
  each kind to its own expert far more often than chance (1/4).
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralForCausalLM,
    pipeline,
)

from data_prep.tokenizer import train_bpe
from hf_vram.errors import UserError
from hf_vram.moe.assemble import AssembleSpec, ExpertSpec, assemble, read_mergekit_yaml

LOGIT_TOL = 1e-4
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "max_position_embeddings": 64,
}
KINDS = ("numbers", "animals", "code", "shouted")
ANIMALS = ["cat", "dog", "horse", "bird", "fish", "mouse", "sheep", "goat", "frog", "duck"]
VERBS = ["sees", "chases", "likes", "follows", "finds", "meets"]
PLACES = ["in the field", "near the river", "on the hill", "under the tree", "by the barn"]
NAMES = ["f", "g", "h", "add", "mul", "step", "inc", "scale"]
OPS = ["+", "-", "*"]
SHOUTS = ["STOP", "RUN", "NOW", "HELP", "LOOK", "WAIT", "GO", "FIRE", "WATCH", "OUT"]


def line(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a} + {b} = {a + b}"
    if kind == "animals":
        return f"the {rng.choice(ANIMALS)} {rng.choice(VERBS)} the {rng.choice(ANIMALS)} {rng.choice(PLACES)}"
    if kind == "code":
        return f"def {rng.choice(NAMES)}(x): return x {rng.choice(OPS)} {rng.randint(1, 9)}"
    return " ".join(rng.choice(SHOUTS) for _ in range(rng.randint(3, 6))) + "!"


def lines(kind: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{kind}-{seed}")
    return [line(kind, rng) for _ in range(n)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Width-64 matmuls gain nothing from a second thread, and waiting for a busy core (other test processes)
    makes the same steps many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [t for kind in KINDS for t in lines(kind, 200, seed=0)]
    return train_bpe(texts, vocab_size=300, model_max_length=64)


def _train(model, tokenizer, texts: list[str], steps: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(steps):
        batch = tokenizer(rng.sample(texts, 16), return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dense(tmp_path_factory, tokenizer) -> Path:
    """One tiny Llama, briefly trained on all four kinds so its logits are not those of a random model."""
    torch.manual_seed(0)
    config = LlamaConfig(
        **TINY,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    texts = [t for kind in KINDS for t in lines(kind, 200, seed=1)]
    losses = _train(model, tokenizer, texts, steps=40, seed=0)
    assert losses[-1] < 0.6 * losses[0], losses
    return _save(model, tokenizer, tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="module")
def experts(tmp_path_factory, tokenizer, dense) -> dict[str, Path]:
    """Four fine-tunes of the dense model, each on its own kind of text."""
    out = {}
    for i, kind in enumerate(KINDS):
        torch.manual_seed(i)
        model = LlamaForCausalLM.from_pretrained(dense)
        losses = _train(model, tokenizer, lines(kind, 200, seed=2), steps=40, seed=i)
        assert losses[-1] < losses[0], (kind, losses)
        out[kind] = _save(model, tokenizer, tmp_path_factory.mktemp(f"expert-{kind}"))
    return out


@pytest.fixture(scope="module")
def routed_moe(tmp_path_factory, experts, dense) -> Path:
    spec = AssembleSpec(
        base_model=str(dense),
        experts=[ExpertSpec(str(experts[kind]), positive_prompts=lines(kind, 12, seed=3)) for kind in KINDS],
        gate_mode="hidden",
    )
    return assemble(spec, tmp_path_factory.mktemp("moe") / "routed")


def _logits(model, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits[batch.attention_mask.bool()]  # padded positions differ by construction; compare real tokens


@pytest.mark.parametrize(("gate_mode", "k"), [("hidden", 2), ("cheap_embed", 2), ("random", 2), ("random", 1)])
def test_copies_of_one_model_compute_the_dense_model(tmp_path, dense, tokenizer, gate_mode, k):
    spec = AssembleSpec(
        base_model=str(dense),
        experts=[ExpertSpec(str(dense), positive_prompts=lines(kind, 3, seed=4)) for kind in KINDS],
        gate_mode=gate_mode,
        experts_per_token=k,
    )
    out = assemble(spec, tmp_path / "moe")
    moe = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(moe, MixtralForCausalLM)
    assert (moe.config.num_local_experts, moe.config.num_experts_per_tok) == (4, k)
    texts = [t for kind in KINDS for t in lines(kind, 3, seed=5)]
    reference = _logits(LlamaForCausalLM.from_pretrained(dense).eval(), tokenizer, texts)
    got = _logits(moe.eval(), tokenizer, texts)
    error = (got - reference).abs().max().item()
    print(f"dense equivalence, gate_mode={gate_mode} k={k}: max |logit error| = {error:.2e}")
    assert error < LOGIT_TOL, error
    assert reference.std().item() > 0.5  # the logits have spread, so the tolerance means something


def test_a_tied_mistral_with_a_sliding_window_keeps_both(tmp_path, tokenizer):
    """A Mistral base keeps its sliding window (attention over long inputs stays the base's) and tied embeddings."""
    torch.manual_seed(0)
    config = MistralConfig(**TINY, sliding_window=4, tie_word_embeddings=True, initializer_range=0.2)
    dense_path = _save(MistralForCausalLM(config), tokenizer, tmp_path / "mistral")
    spec = AssembleSpec(str(dense_path), [ExpertSpec(str(dense_path))] * 3, gate_mode="random", experts_per_token=2)
    moe = AutoModelForCausalLM.from_pretrained(assemble(spec, tmp_path / "moe"))
    assert moe.config.sliding_window == 4 and moe.config.tie_word_embeddings
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    texts = lines("animals", 3, seed=5)  # ~10 tokens each: longer than the window
    reference = _logits(MistralForCausalLM.from_pretrained(dense_path).eval(), tokenizer, texts)
    error = (_logits(moe.eval(), tokenizer, texts) - reference).abs().max().item()
    print(f"dense equivalence, tied Mistral with sliding window: max |logit error| = {error:.2e}")
    assert error < LOGIT_TOL and reference.std().item() > 0.5, (error, reference.std().item())


def _own_expert_rates(moe, tokenizer, held_out: dict[str, list[str]]) -> tuple[float, float]:
    """How often the router's top-1 expert is the prompt's own: (at the last token, over all tokens),
    counted over every layer."""
    last_hits = last_total = all_hits = all_total = 0
    for own, kind in enumerate(KINDS):
        for text in held_out[kind]:
            ids = tokenizer(text, return_tensors="pt").input_ids
            with torch.no_grad():
                router_logits = moe(input_ids=ids, output_router_logits=True).router_logits
            for layer_logits in router_logits:  # (tokens, experts)
                top1 = layer_logits.argmax(dim=-1)
                last_hits += int(top1[-1] == own)
                last_total += 1
                all_hits += int((top1 == own).sum())
                all_total += top1.numel()
    return last_hits / last_total, all_hits / all_total


def test_hidden_gates_route_each_kind_to_its_own_expert(routed_moe, tokenizer):
    moe = AutoModelForCausalLM.from_pretrained(routed_moe).eval()
    held_out = {kind: lines(kind, 20, seed=6) for kind in KINDS}
    last_token, all_tokens = _own_expert_rates(moe, tokenizer, held_out)
    print(f"own-expert top-1 rate (chance 0.25): last token {last_token:.2f}, all tokens {all_tokens:.2f}")
    assert last_token > 0.6, last_token
    assert all_tokens > 0.4, all_tokens


def test_moe_experts_are_the_source_models_mlps(routed_moe, experts):
    moe = AutoModelForCausalLM.from_pretrained(routed_moe)
    for i, kind in enumerate(KINDS):
        source = LlamaForCausalLM.from_pretrained(experts[kind])
        for moe_layer, layer in zip(moe.model.layers, source.model.layers):
            gate_up = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight])
            torch.testing.assert_close(moe_layer.mlp.experts.gate_up_proj[i], gate_up, rtol=0, atol=0)
            torch.testing.assert_close(moe_layer.mlp.experts.down_proj[i], layer.mlp.down_proj.weight, rtol=0, atol=0)


def test_cheap_embed_in_bfloat16_makes_a_working_model(tmp_path, experts, dense, tokenizer):
    spec = AssembleSpec(
        base_model=str(dense),
        experts=[ExpertSpec(str(experts[kind]), positive_prompts=lines(kind, 5, seed=3)) for kind in KINDS],
        gate_mode="cheap_embed",
        dtype="bfloat16",
        experts_per_token=1,
    )
    out = assemble(spec, tmp_path / "cheap")
    moe = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(moe, MixtralForCausalLM) and moe.dtype == torch.bfloat16
    gates = torch.stack([layer.mlp.gate.weight.float() for layer in moe.model.layers])
    assert torch.allclose(gates.norm(dim=-1), torch.ones(2, 4), atol=1e-2)  # unit rows
    assert torch.equal(gates[0], gates[1])  # cheap_embed: one row per expert, shared by every layer
    batch = tokenizer(lines("numbers", 4, seed=7), return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.no_grad():
        loss = moe(**batch, labels=labels).loss.item()
    assert loss < 3.0, loss  # a random 300-token model scores ln(300) = 5.7; this one has learnt the text
    record = json.loads((out / "assembly.json").read_text())
    assert record["spec"]["gate_mode"] == "cheap_embed" and len(record["spec"]["experts"]) == 4


def test_output_loads_and_generates_with_a_pipeline(routed_moe):
    config = json.loads((routed_moe / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"] and config["sliding_window"] is None
    generator = pipeline("text-generation", model=str(routed_moe))
    assert isinstance(generator.model, MixtralForCausalLM)
    text = generator("12 + 30 =", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert text.startswith("12 + 30 =") and len(text) > len("12 + 30 =")


def _write_yaml(folder: Path, data: dict) -> Path:
    path = folder / "moe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_mergekit_yaml_round_trips_with_relative_paths(tmp_path, experts, dense):
    models = tmp_path / "models"
    shutil.copytree(dense, models / "base")
    shutil.copytree(experts["numbers"], models / "math")
    shutil.copytree(experts["animals"], models / "zoo")
    path = _write_yaml(
        tmp_path,
        {
            "base_model": "models/base",
            "gate_mode": "cheap_embed",
            "dtype": "bfloat16",
            "experts_per_token": 1,
            "experts": [
                {"source_model": "models/math", "positive_prompts": ["1 + 2 ="], "negative_prompts": ["the cat"]},
                {"source_model": "./models/zoo", "positive_prompts": ["the dog sees the cat"]},
            ],
        },
    )
    spec = read_mergekit_yaml(path)
    assert spec == AssembleSpec(
        base_model=str(models / "base"),
        experts=[
            ExpertSpec(str(models / "math"), ["1 + 2 ="], ["the cat"]),
            ExpertSpec(str(models / "zoo"), ["the dog sees the cat"], []),
        ],
        gate_mode="cheap_embed",
        dtype="bfloat16",
        experts_per_token=1,
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"experts_per_tokens": 2}, "experts_per_tokens: unknown key (did you mean 'experts_per_token'?)"),
        (
            {"gate_mode": "hiden"},
            "gate_mode: 'hiden' is not one of hidden, cheap_embed, random (did you mean 'hidden'?)",
        ),
        ({"shared_experts": [{"source_model": "x"}]}, "shared_experts: not supported"),
        ({"architecture": "qwen"}, "architecture: 'qwen' is not supported"),
        ({"experts_per_token": 3}, "experts_per_token: 3 must be a whole number from 1 to the number of experts (2)"),
        ({"base_model": "./missing"}, "missing does not exist; paths are relative to the YAML file's folder"),
    ],
)
def test_mergekit_yaml_errors_name_the_key_and_the_fix(tmp_path, dense, change, expected):
    data = {
        "base_model": str(dense),
        "experts": [{"source_model": str(dense), "positive_prompts": ["a"]}] * 2,
        **change,
    }
    with pytest.raises(UserError) as err:
        read_mergekit_yaml(_write_yaml(tmp_path, data))
    assert expected in str(err.value) and "moe.yaml" in str(err.value)


def test_mergekit_yaml_expert_errors(tmp_path, dense):
    data = {
        "base_model": str(dense),
        "experts": [
            {"source_model": str(dense), "positive_prompt": ["a"]},
            {"source_model": str(dense), "positive_prompts": ["a"], "noise_scale": 0.1},
        ],
    }
    with pytest.raises(UserError) as err:
        read_mergekit_yaml(_write_yaml(tmp_path, data))
    message = str(err.value)
    assert "experts[0].positive_prompt: unknown key (did you mean 'positive_prompts'?)" in message
    assert "experts[1].noise_scale: not supported" in message


def test_an_expert_of_another_shape_is_named(tmp_path, dense, tokenizer):
    wider = LlamaForCausalLM(LlamaConfig(**{**TINY, "intermediate_size": 96}))
    odd = _save(wider, tokenizer, tmp_path / "odd")
    spec = AssembleSpec(
        base_model=str(dense), experts=[ExpertSpec(str(dense)), ExpertSpec(str(odd))], gate_mode="random"
    )
    with pytest.raises(UserError, match=r"experts\[1\] '.*odd': intermediate_size is 96 but the base model .* has 128"):
        assemble(spec, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failure_mid_assembly_leaves_no_output(tmp_path, dense):
    # The last expert's config is fine but its weights are cut short: the failure comes after the base and the
    # first experts are loaded and copied.
    broken = tmp_path / "broken"
    shutil.copytree(dense, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    missing = tmp_path / "nowhere"
    out = tmp_path / "out"
    for bad, why in ((broken, "the weights cannot be loaded"), (missing, "no such folder")):
        spec = AssembleSpec(
            base_model=str(dense),
            experts=[ExpertSpec(str(dense)), ExpertSpec(str(dense)), ExpertSpec(str(bad))],
            gate_mode="random",
        )
        with pytest.raises(UserError, match=re.escape(f"experts[2] '{bad}': {why}")):
            assemble(spec, out)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no output, no leftover temporary


def test_an_existing_output_is_not_overwritten(tmp_path, dense):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    spec = AssembleSpec(base_model=str(dense), experts=[ExpertSpec(str(dense))] * 2, gate_mode="random")
    with pytest.raises(UserError, match="already exists"):
        assemble(spec, out)
    assert (out / "keep.txt").read_text() == "mine"
