"""The long-context memory savings leave training unchanged: the fused LM-head loss (SFT, DPO, pretraining) equals the
plain full-logits loss, loss and gradients, masked labels and num_items_in_batch included (fp32, CPU: relative
1e-5); activation offloading and tiled MLPs give the same loss and gradients as the plain step; the 4-bit base's
unquantized weights in bf16 train like the fp32 ones; and no step of the fused path ever holds the logits."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from hf_vram.recipe.load import load_recipe
from hf_vram.runners.run import finish, setup
from hf_vram.train.savings import full_logits_loss

from .conftest import SAMPLE_DATA, write_recipe
from .test_train_qlora import qlora_recipe

RTOL = 1e-5


def _run(tmp_path, name, recipe):
    return setup(load_recipe(str(write_recipe(tmp_path, name, recipe))))


def _batch(run):
    return next(iter(run.trainer.get_train_dataloader()))


def _loss_and_grads(trainer, batch, num_items=None):
    model = trainer.model
    model.train()
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def _assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, rtol=RTOL, atol=0)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        scale = grads_b[name].abs().max()
        # Relative to the tensor's largest gradient: single entries near zero carry only rounding.
        assert (grads_a[name] - grads_b[name]).abs().max() <= RTOL * scale + 1e-12, name


def _lora_recipe(base, out, **train):
    recipe = qlora_recipe(base, out, **{"micro_batch_size": 4, **train})
    recipe["quant"] = {}  # a plain fp32 base: the comparison is of the loss, not of 4-bit rounding
    recipe["eval"] = {"score_samples": 0}
    return recipe


def test_sft_fused_loss_equals_full_logits_with_masks_and_num_items(tmp_path, tiny_base):
    run = _run(tmp_path, "sft", _lora_recipe(tiny_base, tmp_path / "out"))
    batch = _batch(run)
    labels = batch["labels"]
    assert (labels == -100).any() and (labels != -100).any()  # the prompt is masked, the answer trained
    trained = int((labels[:, 1:] != -100).sum())
    for num_items in (None, 2 * trained):  # the micro-batch's own count, and one of a 2-step accumulation
        fused = _loss_and_grads(run.trainer, batch, num_items)
        run.trainer.compute_loss_func = full_logits_loss(run.model)
        plain = _loss_and_grads(run.trainer, batch, num_items)
        run.trainer.compute_loss_func = None
        _assert_same(fused, plain)
    assert fused[0] > 0


class _LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an op produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.fixture(scope="module")
def wide_vocab_base(tmp_path_factory, tiny_base):
    """The tiny base's tokenizer over a 131,072-row vocabulary (Llama-3's is 128,256): trl's tiles are 32,768
    vocabulary entries wide, so only a vocabulary wider than a tile shows what they save."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("wide-vocab")
    config = AutoConfig.from_pretrained(tiny_base)
    config.vocab_size = 4 * 32768
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(path)
    return path


def test_fused_training_step_and_its_metrics_never_hold_the_logits(tmp_path, wide_vocab_base):
    """A whole SFT training step, forward, backward and trl's token accuracy and entropy, with no tensor of the
    [tokens x vocabulary] logits' size (the CPU head's chunks are a quarter of it here at most); the plain path
    makes them."""
    from hf_vram.train.cpu_fused_loss import CHUNK_VALUES

    recipe = _lora_recipe(wide_vocab_base, tmp_path / "out", micro_batch_size=16)
    recipe["data"]["max_length"] = 64
    run = _run(tmp_path, "sft", recipe)
    batch = _batch(run)
    tokens, vocab = batch["input_ids"].numel(), run.model.config.vocab_size
    assert tokens * vocab >= 4 * CHUNK_VALUES
    trainer = run.trainer
    trainer.current_gradient_accumulation_steps = 1  # set by train() for its steps; this step runs on its own
    with _LargestTensor() as seen:
        trainer.training_step(trainer.model, dict(batch))
    assert seen.largest <= tokens * vocab / 4, (seen.largest, tokens * vocab)
    assert {"mean_token_accuracy", "entropy"} <= trainer._metrics["train"].keys()
    trainer.compute_loss_func = full_logits_loss(trainer.model)
    with _LargestTensor() as plain:
        trainer.training_step(trainer.model, dict(batch))
    assert plain.largest >= tokens * vocab


def _pretrain_recipe(tmp_path, **train):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"{a} plus {b} is {a + b}. " for a in range(40) for b in range(12)))
    return {
        "task": "pretrain",
        "model": {"arch": "llama", "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                               "num_attention_heads": 2, "num_key_value_heads": 2}},
        "tokenizer": {"train": True, "vocab_size": 300},
        "data": {"source": str(text), "format": "text", "max_length": 32},
        "train": {"output_dir": str(tmp_path / "out"), "micro_batch_size": 4, "max_steps": 3, "warmup": 0,
                  "logging_steps": 1, "report_to": [], "fused_loss": True, **train},
    }


def test_pretrain_fused_loss_equals_the_models_own(tmp_path):
    run = _run(tmp_path, "pretrain", _pretrain_recipe(tmp_path))
    assert run.trainer.fused_loss
    batch = _batch(run)
    for num_items in (None, 2 * batch["labels"].numel()):
        fused = _loss_and_grads(run.trainer, batch, num_items)
        run.trainer.fused_loss = False
        plain = _loss_and_grads(run.trainer, batch, num_items)
        run.trainer.fused_loss = True
        _assert_same(fused, plain)


def _sequence_logps(logits, input_ids, completion_mask):
    labels = input_ids[:, 1:]
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (logps * completion_mask[:, 1:]).sum(-1)


def test_dpo_loss_equals_the_full_logits_dpo_loss(tmp_path, tiny_base):
    """trl's DPOTrainer scores log-probabilities in tiles (always); its loss and gradients equal DPO's sigmoid loss
    written out on full logits, the reference being the base with the adapter off."""
    recipe = _lora_recipe(tiny_base, tmp_path / "out")
    recipe.update(task="dpo", data={"source": str(SAMPLE_DATA / "dpo_en_demo.json"), "format": "preference",
                                    "max_length": 64, "max_samples": 16})
    run = _run(tmp_path, "dpo", recipe)
    batch = _batch(run)
    fused = _loss_and_grads(run.trainer, batch)
    model, beta = run.trainer.model, run.trainer.beta
    model.zero_grad(set_to_none=True)
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    policy = _sequence_logps(model(input_ids=ids, attention_mask=mask).logits, ids, completion)
    with torch.no_grad(), model.disable_adapter():
        ref = _sequence_logps(model(input_ids=ids, attention_mask=mask).logits, ids, completion)
    (pc, pr), (rc, rr) = policy.chunk(2), ref.chunk(2)
    loss = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    loss.backward()
    plain = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    _assert_same(fused, plain)


def test_offloading_and_tiled_mlp_keep_loss_and_gradients(tmp_path, tiny_base):
    """With checkpointing: offloaded layer inputs (host copies on the CPU, trl's OffloadActivations on a GPU) and
    MLPs tiled along the sequence give the plain step's loss and gradients."""
    recipe = _lora_recipe(tiny_base, tmp_path / "plain", gradient_checkpointing=True, tiled_mlp=False,
                          activation_offloading=False)
    recipe["data"]["max_length"] = 96
    plain_run = _run(tmp_path, "plain", recipe)
    recipe["train"].update(output_dir=str(tmp_path / "saved"), tiled_mlp=True, activation_offloading=True)
    run = _run(tmp_path, "saved", recipe)
    assert sum(hasattr(m, "_untiled_forward") for m in run.model.modules()) == 2
    assert run.summary["memory_savings"] == ["tiled MLP (64 tokens per tile)", "activation offloading to CPU memory"]
    assert plain_run.summary["memory_savings"] == []
    run.model.base_model.model.model.layers[0].mlp._tile_tokens = 16  # several tiles at this length
    run.model.base_model.model.model.layers[1].mlp._tile_tokens = 16
    plain_params = dict(plain_run.model.named_parameters())
    with torch.no_grad():  # the same adapter initialisation on both sides
        for name, p in run.model.named_parameters():
            if p.requires_grad:
                p.copy_(plain_params[name])
    batch = _batch(plain_run)
    with plain_run.trainer.maybe_activation_offload_context:
        plain = _loss_and_grads(plain_run.trainer, batch)
    offload = run.trainer.maybe_activation_offload_context
    with offload:
        saved = _loss_and_grads(run.trainer, batch)
    _assert_same(saved, plain)
    hidden = run.model.config.hidden_size
    # At least each layer's checkpointed input went to host memory.
    assert offload.host_bytes >= 2 * batch["input_ids"].numel() * hidden * 4


def test_tiled_mlp_backward_replays_forwards_dropout():
    """With dropout in the MLP (LoRA's), the gradient of the tiled MLP is the derivative of what its forward computed:
    central differences along a random direction, each forward with the same seed, agree with it."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from hf_vram.train.tiled_mlp import tile_mlps

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2)
    holder = torch.nn.Module()
    holder.config, holder.mlp = config, LlamaMLP(config).double()
    holder = get_peft_model(holder, LoraConfig(r=4, lora_dropout=0.5, target_modules=["gate_proj", "up_proj", "down_proj"],
                                               init_lora_weights=False))
    assert tile_mlps(holder, tile_tokens=8) == 1
    mlp = holder.base_model.model.mlp
    x = torch.randn(2, 40, 16, dtype=torch.float64, requires_grad=True)

    def loss():
        torch.manual_seed(7)
        return (mlp(x) ** 2).sum()

    loss().backward()
    lora = [p for p in holder.parameters() if p.requires_grad]
    direction = [torch.randn_like(p) for p in lora]
    analytic = sum((p.grad * d).sum() for p, d in zip(lora, direction)) + (x.grad * (dx := torch.randn_like(x))).sum()
    eps = 1e-6
    with torch.no_grad():
        def shifted(sign):
            for p, d in zip(lora, direction):
                p.add_(sign * eps * d)
            x.add_(sign * eps * dx)
            with torch.enable_grad():
                value = loss().item()
            for p, d in zip(lora, direction):
                p.sub_(sign * eps * d)
            x.sub_(sign * eps * dx)
            return value

        numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    assert abs(numeric - analytic.item()) <= 1e-6 * abs(numeric), (numeric, analytic.item())


def test_peft_still_casts_unquantized_weights_to_fp32(tiny_base):
    """hf-vram undoes peft 0.21's cast of a 4-bit base's unquantized weights to fp32 (builders/model.py's
    cast_unquantized); this fails if peft stops casting, and the undoing can go."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    prepare_model_for_kbit_training(model)
    assert model.get_input_embeddings().weight.dtype == torch.float32


def _bf16_qlora(tmp_path, base, name, unquantized_dtype):
    recipe = qlora_recipe(base, tmp_path / name, max_steps=25)
    recipe["quant"].update(compute_dtype="bfloat16", unquantized_dtype=unquantized_dtype)
    recipe["eval"] = {"score_samples": 0}
    run = _run(tmp_path, name, recipe)
    return run, finish(run)


def test_unquantized_weights_in_bf16_train_as_fp32_ones(tmp_path, tiny_base):
    """The tiny QLoRA in bf16 compute: embeddings, norms and LM head in bf16 (the default) against fp32 (peft's
    choice); the loss curve is the same within bf16's noise and both learn."""
    run16, s16 = _bf16_qlora(tmp_path, tiny_base, "bf16", "compute")
    run32, s32 = _bf16_qlora(tmp_path, tiny_base, "fp32", "float32")
    base16 = run16.model.get_base_model()
    assert base16.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base16.get_output_embeddings().weight.dtype == torch.bfloat16
    assert base16.model.norm.weight.dtype == torch.bfloat16
    assert run32.model.get_base_model().get_input_embeddings().weight.dtype == torch.float32
    assert all(isinstance(m.weight, bnb.nn.Params4bit) for m in base16.modules() if isinstance(m, bnb.nn.Linear4bit))
    l16 = [e["loss"] for e in run16.trainer.state.log_history if "loss" in e]
    l32 = [e["loss"] for e in run32.trainer.state.log_history if "loss" in e]
    assert len(l16) == len(l32) == 25
    assert s16["final_loss"] < 0.9 * s16["first_loss"] and s32["final_loss"] < 0.9 * s32["first_loss"]
    # bf16 keeps 8 bits of mantissa: step by step the curves agree to a few percent, never drift apart.
    worst = max(abs(a - b) / b for a, b in zip(l16, l32))
    print("loss bf16", [round(v, 3) for v in l16], "\nloss fp32", [round(v, 3) for v in l32], "\nworst", worst)
    assert worst < 0.05, worst


def test_liger_kernels_refused_where_they_cannot_run(tmp_path, tiny_base):
    from hf_vram.builders.long_context import liger_on
    from hf_vram.errors import UserError

    r = load_recipe(str(write_recipe(tmp_path, "k", _lora_recipe(tiny_base, tmp_path / "o", kernels="liger")))).recipe
    with pytest.raises(UserError, match="GPU only"):
        liger_on(r, cuda=False)
    auto = r.model_copy(update={"train": r.train.model_copy(update={"kernels": "auto"})})
    assert liger_on(auto, cuda=False) is False


OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@pytest.mark.parametrize("softcap, scale, bias, train_head, entropy_grad", [
    (None, 1.0, False, False, False),  # what SFT and DPO run: a frozen head, entropy only logged
    (30.0, 0.5, True, False, False),  # Gemma-style softcapping and a scaled, biased head
    (None, 1.0, True, True, False),  # a trained head (full fine-tune): backward recomputes with autograd
    (None, 1.0, False, False, True),  # a differentiated entropy: recomputed too
])
def test_cpu_fused_head_equals_trls_kernel(softcap, scale, bias, train_head, entropy_grad):
    """hf-vram's CPU function against trl's own (its torch fallback here): every output, and the gradients of
    hidden states, head weight and bias, for an arbitrary upstream gradient per token (fp64 in; both fold the
    logits in fp32: outputs within 1e-4 absolute, gradients within 1e-5 of their largest value)."""
    from trl.kernels import ChunkedLogProbFunction

    from hf_vram.train.cpu_fused_loss import CPUChunkedLogProbs

    torch.manual_seed(0)
    n, h, v = 300, 32, 5000
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=train_head)
    b = torch.randn(v, dtype=torch.float64, requires_grad=train_head) if bias else None
    targets = torch.randint(0, v, (n,))
    upstream, upstream_entropy = torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    inputs = [t for t in (hidden, weight, b) if t is not None and t.requires_grad]
    results = []
    for function in (ChunkedLogProbFunction, CPUChunkedLogProbs):
        out = function.apply(hidden, weight, b, targets, 0.7, 1024, softcap, scale, OUTPUTS)
        objective = (out[0] * upstream).sum() + ((out[1] * upstream_entropy).sum() if entropy_grad else 0)
        results.append((out, torch.autograd.grad(objective, inputs)))
    (trl_out, trl_grads), (out, grads) = results
    for name, a, b_ in zip(OUTPUTS, trl_out, out):
        if a.dtype == torch.bool:
            assert torch.equal(a, b_), name
        else:
            torch.testing.assert_close(b_.double(), a.double(), rtol=1e-5, atol=1e-4, msg=name)
    for a, b_ in zip(trl_grads, grads):
        assert (a - b_).abs().max() <= 1e-5 * a.abs().max()


def test_trl_still_looks_up_its_fused_kernel_at_call_time():
    """use_cpu_fused_loss replaces trl.trainer.utils._ChunkedLogProbFunction (trl 1.16), which trl's fused forward
    reads at every call; this fails if trl stops doing so, and the CPU path would silently be trl's again."""
    import inspect

    import trl.trainer.utils as trl_utils

    from hf_vram.train.cpu_fused_loss import CHUNK_VALUES, use_cpu_fused_loss
    from hf_vram.vram.estimate import CPU_CHUNK_VALUES

    assert "_ChunkedLogProbFunction.apply(" in inspect.getsource(trl_utils.add_fused_lm_head)
    use_cpu_fused_loss()
    use_cpu_fused_loss()  # idempotent
    assert trl_utils._ChunkedLogProbFunction.__name__ == "_OnTheCPU"
    assert trl_utils._ChunkedLogProbFunction.trl_function.__name__ == "ChunkedLogProbFunction"
    # Only inside hf-vram's trainers (cpu_fused_head): plain trl in the same process keeps its own kernel.
    from hf_vram.train.cpu_fused_loss import CPUChunkedLogProbs, cpu_fused_head

    used = []
    original = CPUChunkedLogProbs.apply
    CPUChunkedLogProbs.apply = lambda *a: used.append(1) or original(*a)
    try:
        args = (torch.randn(4, 8), torch.randn(16, 8), None, torch.zeros(4, dtype=torch.long), 1.0, 32768)
        trl_utils._ChunkedLogProbFunction.apply(*args)
        assert not used
        with cpu_fused_head():
            trl_utils._ChunkedLogProbFunction.apply(*args)
        assert used == [1]
    finally:
        CPUChunkedLogProbs.apply = original
    assert CHUNK_VALUES == CPU_CHUNK_VALUES  # the planner's copy of the chunk size


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(config)


def test_tiled_mlp_gives_each_parameter_one_gradient_under_ddp(tmp_path):
    """DDP's hooks accept one gradient per parameter and step: the tiles' gradients are summed and returned once,
    and equal the plain model's."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from hf_vram.train.tiled_mlp import tile_mlps

    plain, tiled = _tiny_llama(), _tiny_llama()
    assert tile_mlps(tiled, tile_tokens=16) == 2
    ids = torch.randint(0, 100, (2, 70))
    plain(input_ids=ids, labels=ids).loss.backward()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(tiled)
        ddp(input_ids=ids, labels=ids).loss.backward()
    finally:
        dist.destroy_process_group()
    for (name, p), q in zip(plain.named_parameters(), tiled.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-12, name


def test_tiled_mlp_recompute_is_not_offloaded():
    """Offloading's hooks stay on through backward (trl wraps the whole step); the tiles recomputed there are not
    packed: tiling adds nothing to what is offloaded."""
    from hf_vram.train.offload import HostCopies
    from hf_vram.train.tiled_mlp import tile_mlps

    ids = torch.randint(0, 100, (2, 70))
    moved = []
    for tile in (False, True):
        model = _tiny_llama()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if tile:
            tile_mlps(model, tile_tokens=16)
        hooks = HostCopies(model)
        with hooks:
            model(input_ids=ids, labels=ids).loss.backward()
        moved.append(hooks.host_bytes)
    assert moved[0] > 0 and moved[1] == moved[0], moved
