"""Prediction against measurement: one training step of a model measured (hf_vram.vram.measure) beside what
hf_vram.vram.estimate predicts for the same settings on the CPU (fp32 compute, no CUDA context). The loss is
the model's own (full logits): trl's fused LM head takes a Triton path on GPUs that the CPU cannot show, so its
cost is checked by the GPU script instead.

Full fine-tunes are measured at full size on fake tensors (shapes only, no memory). Adapters (peft cannot wrap
fake layers), 4-bit and 8-bit bases (bitsandbytes cannot quantize them) and mixtures of experts are measured on
real tensors, which needs a size that fits in RAM (shrink the recipe by override).
"""

from __future__ import annotations

import tempfile

import torch

from hf_vram.recipe.schema import Recipe
from hf_vram.vram.estimate import OPTIMIZERS_8BIT, Plan, estimate
from hf_vram.vram.gpus import GPU
from hf_vram.vram.measure import Measured, measure_step

# The categories a CPU measurement can see (no CUDA context or allocator slack).
MEASURABLE = ("weights", "adapter", "gradients", "optimizer states", "activations", "logits and loss")
CPU = GPU("CPU (fp32 compute)", 1e9, 1.0)


def _build(config, recipe: Recipe):
    from transformers import AutoModelForCausalLM

    if recipe.quant.bits:
        from hf_vram.builders.quant import bnb_config

        # bitsandbytes quantizes at load time: a random model of the config is saved, then loaded quantized.
        folder = tempfile.mkdtemp(prefix="hf-vram-measure-")
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        quant = bnb_config(recipe.quant.model_copy(update={"compute_dtype": "float32"}))
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.float32, device_map={"": "cpu"})
        from peft import prepare_model_for_kbit_training

        from hf_vram.builders.model import keep_4bit_layout_for_training

        keep_4bit_layout_for_training(model)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=recipe.train.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=recipe.model.attn_implementation)
        if recipe.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from hf_vram.builders.model import apply_memory_savings
    from hf_vram.vram.estimate import loss_uses_fused_head

    # Tiled MLPs, as the runner has them; fp32 compute and no liger: the CPU measurement's settings.
    cpu_recipe = recipe.model_copy(update={"quant": recipe.quant.model_copy(update={"compute_dtype": "float32"}),
                                           "train": recipe.train.model_copy(update={"kernels": "none"})})
    apply_memory_savings(model, cpu_recipe, cuda=False)
    if loss_uses_fused_head(config, recipe):
        from trl.trainer.utils import add_fused_lm_head

        from hf_vram.train.cpu_fused_loss import use_cpu_fused_loss

        use_cpu_fused_loss()  # as the runner has it on the CPU
        add_fused_lm_head(model)  # the loss of trl's trainers, called with fused_lm_head=True (measure())
    if recipe.adapter.type != "none":
        from peft import get_peft_model

        from hf_vram.builders.adapter import adapter_config

        adapter = recipe.adapter
        if adapter.type == "llama-adapter":
            adapter = adapter.model_copy(update={"prompt_layers": min(adapter.prompt_layers, config.num_hidden_layers)})
        model = get_peft_model(model, adapter_config(adapter))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model.train()
    return model


def measure(config, recipe: Recipe, fake: bool | None = None) -> Measured:
    """One steady-state step (the second: optimizer states exist) of the recipe's model, batch and optimizer."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    # peft cannot wrap layers on fake tensors (it swaps parameters that carry weak references), and bitsandbytes
    # cannot quantize them: adapters are measured on real tensors, at a size that fits in RAM.
    # Mixture-of-experts layers run grouped matmuls that fake tensors do not support in fp32: real tensors too.
    if fake is None:
        fake = recipe.adapter.type == "none" and not getattr(config, "num_local_experts", None)
    t, d = recipe.train, recipe.data
    from contextlib import nullcontext

    with FakeTensorMode() if fake else nullcontext():
        model = _build(config, recipe)
        ids = torch.randint(0, config.vocab_size, (t.micro_batch_size, d.max_length))
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer in OPTIMIZERS_8BIT and not fake:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    batch = {"input_ids": ids, "labels": ids}
    from hf_vram.builders.long_context import offloading_on
    from hf_vram.vram.estimate import loss_uses_fused_head

    if loss_uses_fused_head(config, recipe):
        batch["fused_lm_head"] = True
    around = None
    if offloading_on(recipe, cuda=False):
        from hf_vram.train.offload import HostCopies

        # The host copies are where offloaded tensors live on a GPU: out of device memory until backward needs them.
        def around(tracker):
            return HostCopies(model, untracked=tracker.untracked)
    from hf_vram.train.cpu_fused_loss import cpu_fused_head

    with cpu_fused_head():  # the fused head's CPU function, as hf-vram's trainers run it
        measure_step(model, batch, optimizer, fake=fake, around_step=around)  # the first step creates the optimizer states
        optimizer.zero_grad(set_to_none=True)
        return measure_step(model, batch, optimizer, fake=fake, around_step=around)


def predicted_for_cpu(config, recipe: Recipe) -> Plan:
    """The estimate at the settings of a CPU measurement: fp32 compute; 8-bit optimizers only when measured real."""
    if recipe.quant.bits is None and recipe.train.optimizer in OPTIMIZERS_8BIT:
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"optimizer": "adamw_torch"})})
    return estimate(config, recipe, CPU, compute_dtype="float32", math_attention=True)


def compare(config, recipe: Recipe) -> dict:
    measured = measure(config, recipe)
    plan = predicted_for_cpu(config, recipe)
    pred = plan.step_peak
    return {"predicted_peak": pred, "measured_peak": measured.peak, "relative_error": (pred - measured.peak) / measured.peak,
            "measured": measured.as_dict(), "predicted": {i.name: i.bytes for i in plan.items if i.name in MEASURABLE}}


def measure_and_compare(loaded) -> str:
    """`hf-vram plan --measure`: the recipe's step measured on the CPU beside its prediction, category by category.
    Full fine-tunes are measured at full size on fake tensors; adapters need real tensors, so a recipe too large
    for this machine's memory is refused with the way to shrink it."""
    import os

    from hf_vram.errors import UserError
    from hf_vram.vram.configs import resolve_config

    recipe = loaded.recipe
    config = resolve_config(loaded)
    plan = predicted_for_cpu(config, recipe)
    if recipe.adapter.type != "none":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if plan.step_peak + plan.params * 4 > ram / 4:
            raise UserError(
                f"--measure: {loaded.name} needs real tensors (an adapter cannot be measured on fake ones) and is too large "
                f"for this machine ({plan.params:,} parameters); measure it at a shrunk size by override, e.g. "
                "model.name_or_path=<a small local model> or data.max_length=128"
            )
    measured = measure(config, recipe)
    m = measured.as_dict()
    pred = {i.name: i.bytes for i in plan.items}
    rows = [
        ("weights (+ adapter)", pred["weights"] + pred.get("adapter", 0), m["weights"]),
        ("gradients", pred["gradients"], m["grads"]),
        ("optimizer states", pred["optimizer states"], m["optimizer"]),
        ("step peak", plan.step_peak, m["peak"]),
    ]
    lines = [f"measured on the CPU (fp32, {'fake' if recipe.adapter.type == 'none' else 'real'} tensors, the model's own loss):",
             f"  {'':<20} {'predicted':>12} {'measured':>12} {'error':>8}"]
    for name, p, got in rows:
        lines.append(f"  {name:<20} {p / 2**20:>9.1f} MiB {got / 2**20:>9.1f} MiB {(p - got) / max(got, 1):>+8.1%}")
    return "\n".join(lines)
