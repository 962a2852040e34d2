"""RetNet (hf_vram.models): the parallel, recurrent and chunkwise forms agree, generation runs through the cache in
constant memory, the model trains, round-trips through save/from_pretrained and serves a text-generation pipeline."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

from hf_vram.models import RetNetCache, RetNetConfig, RetNetForCausalLM, retention_decay
from hf_vram.models.modeling_retnet import (
    chunkwise_retention,
    decay_mask,
    parallel_retention,
    recurrent_retention,
    retention_log_decay,
)

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides) -> RetNetConfig:
    values = dict(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(overrides)
    return RetNetConfig(**values)


def tiny_model(seed: int = 0, sharpen: float = 1.0, **overrides) -> RetNetForCausalLM:
    """A random model in eval mode. `sharpen` scales the query/key weights so that score row sums exceed 1 and the
    row normaliser is actually exercised (at the default init they stay below 1)."""
    torch.manual_seed(seed)
    model = RetNetForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.retention.q_proj.weight.mul_(sharpen)
            layer.retention.k_proj.weight.mul_(sharpen)
    return model


def run(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, output_hidden_states=True, **kwargs)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_decay_is_torchscale_schedule():
    for heads in (1, 3, 4, 8):
        expected = 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float64))
        torch.testing.assert_close(retention_decay(heads).double(), expected, rtol=0, atol=1e-7)
    model = tiny_model()
    torch.testing.assert_close(
        model.model.layers[1].retention.decay.double(),
        1 - 2.0 ** (-5 - torch.arange(4.0, dtype=torch.float64)),
        rtol=0,
        atol=1e-7,
    )
    # The unnormalised parallel mask is gamma^(n - m) on and below the diagonal, zero above.
    gamma = retention_decay(4).double()
    mask = decay_mask(retention_log_decay(4), 6).double()
    n, m = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    expected = torch.where(n >= m, gamma[:, None, None] ** (n - m).clamp(min=0), torch.zeros(()))
    torch.testing.assert_close(mask, expected, rtol=1e-6, atol=0)


def test_retention_kernels_agree_with_padding_and_active_normaliser():
    torch.manual_seed(0)
    batch, heads, length, key_dim, value_dim = 2, 4, 13, 8, 16
    log_decay = retention_log_decay(heads)
    q, k = torch.randn(batch, heads, length, key_dim) * 3, torch.randn(batch, heads, length, key_dim) * 3
    mask = torch.ones(batch, length)
    mask[1, :4] = 0  # left padding on the second row
    v = torch.randn(batch, heads, length, value_dim)
    va = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1) * mask[:, None, :, None]

    parallel, (kv_p, scale_p) = parallel_retention(q, k, va, log_decay, mask, return_state=True)
    assert parallel[..., -1].abs().max() > 1  # row sums large enough for max(|sum|, 1) to divide
    forms = {"recurrent": recurrent_retention(q, k, va, log_decay, mask, None)}
    for size in (1, 3, 5, length):
        forms[f"chunk{size}"] = chunkwise_retention(q, k, va, log_decay, mask, None, size)
    magnitude = parallel.abs().max()
    for name, (out, (kv, scale)) in forms.items():
        assert (out - parallel).abs().max() / magnitude < TOL, name
        assert (kv - kv_p).abs().max() / kv_p.abs().max() < TOL, name
        torch.testing.assert_close(scale, scale_p, rtol=1e-6, atol=0)
    # The scale state is torchscale's decay sum over the real tokens: 13 for row 0, 9 for the padded row.
    gamma = retention_decay(heads).double()
    for row, real in ((0, 13), (1, 9)):
        expected = ((1 - gamma**real) / (1 - gamma)).float()
        torch.testing.assert_close(scale_p[row], expected, rtol=1e-5, atol=0)


def test_parallel_recurrent_chunkwise_forms_give_same_outputs():
    model = tiny_model(sharpen=8.0)
    ids = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = run(model, ids)
    ref_logits, ref_hidden = ref.logits, ref.hidden_states[-1]
    errors = {}

    model.config.forward_impl = "chunkwise"
    for size in (1, 3, ids.shape[1]):  # 3 does not divide T = 11
        model.config.chunk_size = size
        out = run(model, ids)
        errors[f"chunkwise/{size}"] = (max_err(out.logits, ref_logits), max_err(out.hidden_states[-1], ref_hidden))
    model.config.forward_impl, model.config.chunk_size = "parallel", 3

    # Recurrent: one token per call, state carried in the cache.
    cache, logits, hidden = None, [], []
    for t in range(ids.shape[1]):
        out = run(model, ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits)
        hidden.append(out.hidden_states[-1])
    errors["recurrent"] = (max_err(torch.cat(logits, 1), ref_logits), max_err(torch.cat(hidden, 1), ref_hidden))

    # Parallel prefill of 4 tokens, then 7 more at once: chunkwise on top of the cached state.
    first = run(model, ids[:, :4], use_cache=True)
    rest = run(model, ids[:, 4:], cache=first.cache, use_cache=True)
    errors["prefill+chunk"] = (
        max_err(torch.cat([first.logits, rest.logits], 1), ref_logits),
        max_err(torch.cat([first.hidden_states[-1], rest.hidden_states[-1]], 1), ref_hidden),
    )
    print("max abs error vs parallel (logits, final hidden state):", errors)
    for name, (logit_err, hidden_err) in errors.items():
        assert logit_err <= TOL and hidden_err <= TOL, (name, logit_err, hidden_err)


def test_left_padding_matches_unpadded_rows():
    model = tiny_model(sharpen=4.0)
    short = torch.tensor([[5, 17, 42, 8, 9]])
    full = torch.tensor([[11, 12, 13, 14, 15, 16, 17, 18]])
    pad = model.config.pad_token_id
    batch = torch.cat([torch.cat([torch.full((1, 3), pad), short], 1), full])
    attention_mask = torch.cat([torch.cat([torch.zeros(1, 3), torch.ones(1, 5)], 1), torch.ones(1, 8)]).long()
    for impl in ("parallel", "chunkwise"):
        model.config.forward_impl = impl
        padded = run(model, batch, attention_mask=attention_mask).logits
        assert max_err(padded[0, 3:], run(model, short).logits[0]) <= TOL
        assert max_err(padded[1], run(model, full).logits[0]) <= TOL
    model.config.forward_impl = "parallel"
    together = model.generate(batch, attention_mask=attention_mask, max_new_tokens=6, do_sample=False)
    alone = model.generate(short, max_new_tokens=6, do_sample=False)
    assert torch.equal(together[0, 3:], alone[0])


def test_greedy_generate_same_with_and_without_cache_in_constant_memory():
    model = tiny_model(sharpen=4.0)
    prompt = torch.tensor([[1, 7, 23, 7, 23, 61]])
    cached = model.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=True, min_new_tokens=16)
    uncached = model.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=False, min_new_tokens=16)
    assert cached.shape == (1, 22)
    assert torch.equal(cached, uncached)

    # The state after the prompt and after 40 more tokens has the same tensors, shapes and bytes.
    out = run(model, prompt, use_cache=True)
    cache = out.cache
    assert isinstance(cache, RetNetCache)
    shapes = [tuple(v.shape) for layer in cache.layers for v in layer.recurrent_states.values()]
    size = cache.state_nbytes()
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(40):
        out = run(model, token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    assert out.cache is cache
    assert [tuple(v.shape) for layer in cache.layers for v in layer.recurrent_states.values()] == shapes
    assert cache.state_nbytes() == size
    assert cache.get_seq_length() == prompt.shape[1] + 40

    # Through generate too: the returned state is the same size for 2 and 20 new tokens.
    sizes = [
        model.generate(prompt, max_new_tokens=n, do_sample=False, return_dict_in_generate=True).cache.state_nbytes()
        for n in (2, 20)
    ]
    assert sizes == [size, size]


def test_training_reduces_loss_and_updates_every_parameter():
    torch.manual_seed(0)
    model = RetNetForCausalLM(tiny_config())
    ids = torch.tensor([[3, 4, 5, 6, 7, 8] * 4] * 2)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(25):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    unchanged = [name for name, p in model.named_parameters() if torch.equal(p, initial[name])]
    assert not unchanged

    # Gradient checkpointing recomputes the blocks: same loss and gradients as without it.
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert model.model.layers[0].gradient_checkpointing
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b)


def test_save_and_auto_from_pretrained_round_trip(tmp_path):
    model = tiny_model(tie_word_embeddings=True, forward_impl="chunkwise", chunk_size=4)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is RetNetForCausalLM
    assert loaded.config.forward_impl == "chunkwise" and loaded.config.chunk_size == 4
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    assert torch.equal(run(model, ids).logits, run(loaded, ids).logits)
    fresh = AutoModelForCausalLM.from_config(tiny_config())
    assert type(fresh) is RetNetForCausalLM


def test_text_generation_pipeline_from_saved_dir(tmp_path):
    from data_prep.tokenizer import train_bpe

    sentences = [
        "the cat sat on the mat.",
        "the dog sat on the log.",
        "a cat and a dog sat together on the mat.",
        "the bird sang on the branch of the tree.",
    ] * 4
    tokenizer = train_bpe(sentences, vocab_size=300, model_max_length=64)
    torch.manual_seed(0)
    model = RetNetForCausalLM(
        tiny_config(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # A few steps on the sentences so that the continuation is text rather than special tokens.
    batch = tokenizer(sentences[:4], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    generator = pipeline("text-generation", model=str(tmp_path), tokenizer=str(tmp_path), device="cpu")
    assert type(generator.model) is RetNetForCausalLM
    prompt = "the cat"
    text = generator(prompt, max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert text.startswith(prompt) and len(text.strip()) > len(prompt)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    direct = generator.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert text == tokenizer.decode(direct[0], skip_special_tokens=True)
