"""measure_step against hand-computed byte counts on tiny Llamas (fp32: 4 bytes a value, AdamW keeps two moments)."""

from __future__ import annotations

import resource
import sys
from types import SimpleNamespace

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import LlamaConfig, LlamaForCausalLM

from hf_vram.vram.measure import Measured, measure_step
from tests.conftest import TINY_LLAMA

VOCAB = 256


def tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, **{**TINY_LLAMA, **overrides}))


def batch(seq: int, vocab: int = VOCAB) -> dict:
    ids = torch.randint(0, vocab, (2, seq))
    return {"input_ids": ids, "labels": ids.clone()}


def adam_bytes(params) -> int:
    # exp_avg + exp_avg_sq in the parameter's dtype, plus one fp32 scalar `step` per parameter.
    return sum(8 * p.numel() + 4 for p in params)


def full_step(seq: int, checkpointing: bool = False) -> tuple[Measured, LlamaForCausalLM]:
    model = tiny_llama()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return measure_step(model, batch(seq), torch.optim.AdamW(model.parameters(), lr=1e-3)), model


def test_full_fine_tune_counts_each_category():
    m, model = full_step(32)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())  # the rotary inv_freq pair
    assert m.weights == 4 * n + buffers
    assert m.grads == 4 * n
    assert m.optimizer == adam_bytes(params)
    assert m.activations > 0
    assert m.peak >= m.weights + m.grads + m.optimizer
    assert m.peak >= m.weights + m.activations
    assert set(m.as_dict()) == {"weights", "grads", "optimizer", "activations", "peak"}
    # Grads are left for the caller: the step does not zero them.
    assert all(p.grad is not None for p in params)


def test_peak_agrees_with_torch_mem_tracker_where_it_works():
    # MemTracker handles all-trainable models; there both trackers must see the same ops, backward included.
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:
        pytest.skip("torch built without torch.distributed")
    data = batch(32)
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        loss = model(**data).loss
        loss.backward()
        del loss
        optimizer.step()
    reference = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    model = tiny_llama()
    m = measure_step(model, data, torch.optim.AdamW(model.parameters(), lr=1e-3))
    batch_bytes = data["input_ids"].nbytes + data["labels"].nbytes  # registered here, not by MemTracker
    assert m.peak == reference + batch_bytes


def test_activations_grow_with_sequence_and_shrink_with_checkpointing():
    short, _ = full_step(32)
    long, _ = full_step(64)
    checkpointed, _ = full_step(64, checkpointing=True)
    assert long.activations > 1.5 * short.activations
    assert checkpointed.activations < long.activations
    assert checkpointed.weights == long.weights and checkpointed.grads == long.grads


def test_lora_on_4bit_base_counts_packed_weights_and_adapter_state(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = tiny_llama()
    n_base = sum(p.numel() for p in base.parameters())
    quantized = sum(mod.weight.numel() for name, mod in base.named_modules() if name.endswith("_proj"))
    base.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
        device_map={"": "cpu"},
    )
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, target_modules=targets, task_type="CAUSAL_LM"))
    lora = [p for p in model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in lora)

    m = measure_step(model, batch(32), torch.optim.AdamW(lora, lr=1e-3))

    assert m.grads == 4 * n_lora
    assert m.optimizer == adam_bytes(lora)
    # Unquantized (embeddings, norms, lm_head) and LoRA in fp32; each projection packed two values a byte with one
    # fp32 absmax per 64-value block, plus a 16-entry fp32 NF4 code table per layer (possibly shared).
    n_layers = len(targets) * TINY_LLAMA["num_hidden_layers"]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    fixed = 4 * (n_base - quantized + n_lora) + buffers + quantized // 2 + quantized // 64 * 4
    assert fixed + 64 <= m.weights <= fixed + 64 * n_layers
    assert m.weights - 4 * (n_base - quantized + n_lora) - buffers < 0.2 * 4 * quantized
    assert m.activations > 0 and m.peak >= m.weights + m.grads + m.optimizer


def rss_bytes() -> int:
    try:
        import psutil
    except ImportError:  # ru_maxrss is the peak (KiB on Linux, bytes on macOS): coarser but still catches real weights
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return psutil.Process().memory_info().rss


def test_fake_tensors_measure_a_large_model_without_allocating_it():
    rss_before = rss_bytes()
    with FakeTensorMode():
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=32000,
                hidden_size=1024,
                intermediate_size=2816,
                num_hidden_layers=8,
                num_attention_heads=16,
                num_key_value_heads=16,
            )
        )
        data = batch(128, vocab=32000)
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    m = measure_step(model, data, optimizer, fake=True)

    grown = rss_bytes() - rss_before
    assert n > 150_000_000
    assert grown < 0.1 * 4 * n, f"RSS grew {grown / 2**20:.0f} MiB: the fake model allocated real memory"
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert m.weights == 4 * n + buffers
    assert m.grads == 4 * n
    assert m.optimizer == adam_bytes(params)
    assert m.activations > 0 and m.peak >= m.weights + m.grads + m.optimizer


def test_fake_needs_a_fake_model():
    model = tiny_llama()
    with pytest.raises(ValueError, match="fake"):
        measure_step(model, batch(8), torch.optim.AdamW(model.parameters()), fake=True)


class _DataDependent(torch.nn.Module):
    """A model whose loss depends on a tensor's value in Python, which fake tensors cannot know."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, input_ids, labels):
        y = self.lin(torch.nn.functional.one_hot(input_ids, 8).float())
        return SimpleNamespace(loss=y.sum() if y.max().item() > 0 else -y.sum())


def test_fake_failure_is_a_value_error_naming_fake():
    with FakeTensorMode():
        model = _DataDependent()
        data = batch(4, vocab=8)
    with pytest.raises(ValueError, match="fake"):
        measure_step(model, data, torch.optim.AdamW(model.parameters()), fake=True)


def test_real_4bit_layer_in_a_fake_model_is_refused():
    bnb = pytest.importorskip("bitsandbytes")
    with FakeTensorMode():
        model = _DataDependent()
        data = batch(4, vocab=8)
    # Params4bit cannot be made under FakeTensorMode, so a 4-bit layer can only be a real one beside fake tensors.
    model.q = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    with pytest.raises(ValueError, match="fake"):
        measure_step(model, data, torch.optim.AdamW(model.lin.parameters()), fake=True)
