"""BitNet b1.58: ternary-weight training from scratch with transformers' own layers, and export to its packed format.

Training: `to_bitlinear` swaps the linear layers of the decoder blocks of a model built with `from_config` for
transformers' `AutoBitLinear` in online mode: fp32 master weights that every forward quantises to ternary values
(absmean scale per tensor) and whose inputs it quantises to 8 bits (absmax per token), with a straight-through
estimator in the backward pass, so the Trainer and AdamW update the fp32 masters as usual. The embeddings and the
output layer stay in full precision, as in the b1.58 paper.

Export: `export_packed` writes the trained model the way `microsoft/bitnet-b1.58-2B-4T` ships: each decoder weight as
ternary values packed four to a byte (transformers' `pack_weights`) plus one scale, and a `quantization_config` that
makes `AutoModelForCausalLM.from_pretrained(dir)` (hence `pipeline("text-generation", model=dir)`) build
`BitLinear` layers and load them.

Why this is hand-written: transformers loads BitNet checkpoints but has no path to make one. Its quantizer refuses an
online `BitNetQuantConfig` passed to from_pretrained for a checkpoint of plain weights ("does require the model to be
pre-quantized"); its `replace_with_bitnet_linear` builds the new layers on the meta device, so they would still have
to be materialised, given the trained weights and their per-layer RMSNorm (`use_rms_norm`) set to 1 (memory from
`to_empty` is uninitialised: NaN losses); and nothing in it writes packed weights. The two-stage learning-rate and
weight-decay schedule of the BitNet papers has no transformers counterpart either.

torch.compile: transformers decorates the quantisers with `@torch.compile` (`WeightQuant.forward`,
`ActQuant.forward`, `BitLinear.activation_quant`, `BitLinear.post_quant_process`, `unpack_weights`). On CPU the first
training step then compiles with the C++ toolchain (2-7 s for the tiny test model, against 0.01 s eager; a text-
generation pipeline on the packed export took 12 s against 1 s), and again for new shapes. Nothing here changes
that globally: on a GPU the compiled kernels are the fast path. To run eagerly (CPU tests, debugging), wrap the work
in `torch.compiler.set_stance("force_eager")`, which makes PyTorch ignore the decorators (or set
TORCH_COMPILE_DISABLE=1 for a whole process). Eager and compiled agree to float rounding (2.4e-7 on the logits of
the tiny test model, 1.3e-9 on a weight gradient).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import AutoConfig, AutoModelForCausalLM, BitNetQuantConfig, GenerationConfig, TrainerCallback
from transformers.integrations.bitnet import VALUES_PER_ITEM, AutoBitLinear, BitLinear, pack_weights

# ---------------------------------------------------------------------------------------------------------------
# Training layers
# ---------------------------------------------------------------------------------------------------------------


def decoder_layers(model) -> nn.ModuleList:
    """The decoder blocks of a Llama-like causal LM (`model.model.layers` for Llama, BitNet, Mistral, Qwen2...)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__}: no decoder blocks found at model.get_decoder().layers; to_bitlinear handles "
            "Llama-like causal LMs"
        )
    return layers


def _linear_names(model) -> tuple[list[str], list[str]]:
    """(inside the decoder blocks, outside them): names of the plain linear layers of the model."""
    inside = {id(m) for m in decoder_layers(model).modules()}
    blocks, rest = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not isinstance(module, AutoBitLinear):
            (blocks if id(module) in inside else rest).append(name)
    return blocks, rest


def to_bitlinear(model, use_rms_norm: bool = True, rms_norm_eps: float | None = None):
    """Swap every linear layer of the decoder blocks for an online `AutoBitLinear`; returns the same model.

    The layers keep their weight (and bias) Parameters, so the initialisation of `from_config` and any optimizer
    already holding them carry over; the embeddings and lm_head are left alone (full precision, as in the b1.58
    paper). `use_rms_norm` gives each layer the RMSNorm on its input that the b1.58 BitLinear has (LN before the
    absmax quantisation); its weight starts at 1 and trains. BitNetForCausalLM already normalises the input of every
    linear (input / post-attention norms, attn_sub_norm, ffn_sub_norm), so use_rms_norm=False there reproduces the
    2B4T layout exactly; a plain Llama has no norm before o_proj and down_proj, where the extra norm matters.

    `model.config.quantization_config` records the layout (autobitlinear, online, the norm) so that
    `load_training_model` can rebuild it from a saved checkpoint (also Trainer checkpoints).
    """
    eps = rms_norm_eps if rms_norm_eps is not None else getattr(model.config, "rms_norm_eps", 1e-6)
    blocks, rest = _linear_names(model)
    if not blocks:
        if any(isinstance(m, AutoBitLinear) for m in model.modules()):
            return model  # converted already: its layers and recorded config stay as they are
        raise ValueError(f"{type(model).__name__}: no linear layers inside the decoder blocks")
    for name in blocks:
        old = model.get_submodule(name)
        # Built on the meta device, then given the existing Parameters: nothing is allocated twice (a large model
        # would otherwise hold a second random copy of every weight for a moment).
        with torch.device("meta"):
            new = AutoBitLinear(
                old.in_features,
                old.out_features,
                bias=old.bias is not None,
                online_quant=True,
                use_rms_norm=use_rms_norm,
                rms_norm_eps=eps,
            )
        new.weight = old.weight
        new.bias = old.bias
        if new.rms_norm is not None:
            # The norm's weight would stay on meta; a norm starting at 1 is the identity scale of a fresh RMSNorm.
            ones = torch.ones(old.in_features, device=old.weight.device, dtype=old.weight.dtype)
            new.rms_norm.weight = nn.Parameter(ones)
        new.train(old.training)
        model.set_submodule(name, new)
    model.config.quantization_config = BitNetQuantConfig(
        linear_class="autobitlinear",
        quantization_mode="online",
        use_rms_norm=use_rms_norm,
        rms_norm_eps=eps,
        modules_to_not_convert=rest,
    ).to_dict()
    return model


def _checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a save_pretrained folder, one safetensors file or the shards its index names."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for name in files:
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name}: no safetensors weights in {path}")
        state.update(load_file(str(path / name)))
    return state


def load_training_model(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild a training model saved by save_pretrained (or a Trainer checkpoint) after `to_bitlinear`.

    The model is built from its config, converted again with the recorded settings and given the saved fp32 master
    weights, so training can resume from it (or `export_packed` can run on it). from_pretrained is not relied on:
    transformers 5.24 does load such a folder (the recorded quantization_config makes it "pre-quantized" and its
    quantizer builds the same online AutoBitLinear layers), but that is the loader of quantized inference
    checkpoints, and the model comes back with a quantizer attached that the Trainer then inspects.
    """
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    recorded = getattr(config, "quantization_config", None) or {}
    if not isinstance(recorded, dict):
        recorded = recorded.to_dict()
    if recorded.get("linear_class") != "autobitlinear" or recorded.get("quantization_mode") != "online":
        raise ValueError(
            f"{path}: config.json records no BitNet training layout (quantization_config {recorded or None}); "
            "load packed exports with AutoModelForCausalLM.from_pretrained"
        )
    # fp32 master weights: what the optimizer updated and the checkpoint holds.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    to_bitlinear(model, use_rms_norm=bool(recorded.get("use_rms_norm")), rms_norm_eps=recorded.get("rms_norm_eps"))
    state = _checkpoint_state(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied output layer is not saved again: it is missing here but shares the storage of a loaded tensor.
    loaded = {t.data_ptr() for k, t in model.state_dict().items() if k in state}
    untied = [k for k in missing if model.state_dict()[k].data_ptr() not in loaded]
    if untied or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {untied}, unexpected {unexpected})")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.to(device)


# ---------------------------------------------------------------------------------------------------------------
# Quantised weights, export
# ---------------------------------------------------------------------------------------------------------------


def absmean_ternary(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ternary int8 values, scale): the b1.58 weight quantisation, computed as transformers' `WeightQuant` does
    (in fp32, scale = 1 / mean |W| clamped at 1e-5), so `ternary / scale` is the weight the training forward used.
    The scale is also what `BitLinear` stores as `weight_scale`: it divides its integer product by it."""
    w = weight.detach().float()
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * scale).round().clamp(-1, 1).to(torch.int8), scale


def _ternary_counts(values: torch.Tensor) -> torch.Tensor:
    return torch.stack([(values == v).sum() for v in (-1, 0, 1)])


def ternary_fraction(model) -> dict[str, float]:
    """Share of -1, 0 and +1 among the quantised decoder weights ({"-1": .., "0": .., "+1": ..}, summing to 1).

    Reads training models (AutoBitLinear: the masters quantised as the forward does) and packed ones (BitLinear:
    the 2-bit codes 0, 1, 2 of every byte stand for -1, 0, +1). A share of zeros near 1 means collapsed layers.
    """
    counts = torch.zeros(3, dtype=torch.long)
    for module in model.modules():
        if isinstance(module, AutoBitLinear):
            counts += _ternary_counts(absmean_ternary(module.weight)[0]).cpu()
        elif isinstance(module, BitLinear):
            codes = torch.stack([(module.weight >> (2 * i)) & 3 for i in range(VALUES_PER_ITEM)])
            counts += _ternary_counts(codes.to(torch.int8) - 1).cpu()
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no BitNet layers (AutoBitLinear or BitLinear) in the model")
    return {label: int(c) / total for label, c in zip(("-1", "0", "+1"), counts)}


def export_packed(model, output_dir: str | Path, tokenizer=None, dtype: torch.dtype | None = None) -> Path:
    """Write the trained model as a packed BitNet checkpoint that `AutoModelForCausalLM.from_pretrained` loads.

    Each AutoBitLinear weight becomes the two buffers transformers' `BitLinear` loads: `weight`, uint8 of shape
    (out_features / 4, in_features), four ternary rows a byte from `pack_weights` (row r of the first quarter with
    rows r + out/4, r + out/2, r + 3 out/4 in its higher bit pairs; microsoft/bitnet-b1.58-2B-4T's packed weights
    have this shape), and `weight_scale`, shape (1,): BitLinear divides its integer product by it, so it is the
    reciprocal of the absmean. The per-layer RMSNorm weights, embeddings, norms and lm_head are saved as they are,
    in `dtype` (default: the model's; bfloat16 halves them, as 2B4T ships them). config.json carries
    BitNetQuantConfig(bitlinear, offline) with the norm setting of the training layers.
    """
    output_dir = Path(output_dir)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, AutoBitLinear)}
    if not layers:
        raise ValueError("no AutoBitLinear layers: export_packed takes a model converted by to_bitlinear")
    norms = {(m.rms_norm is not None, getattr(m.rms_norm, "variance_epsilon", None)) for m in layers.values()}
    if len(norms) != 1:
        raise ValueError("the AutoBitLinear layers differ in their RMSNorm: one quantization_config cannot say both")
    (use_rms_norm, eps), = norms
    dtype = dtype or model.dtype
    packed_keys = {f"{name}.weight" for name in layers}
    # One CPU copy per storage: tied tensors (embeddings and lm_head) stay one tensor, which save_pretrained then
    # writes once; the fp32 masters of the packed layers are not copied at all.
    copies: dict[tuple, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        if key in packed_keys:
            continue
        ident = (tensor.data_ptr(), tuple(tensor.shape))
        if ident not in copies:
            copies[ident] = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype)
        state[key] = copies[ident]
    for name, module in layers.items():
        if module.out_features % VALUES_PER_ITEM:
            # BitLinear allocates out_features // 4 packed rows; pack_weights would pad instead and not load.
            raise ValueError(f"{name}: out_features {module.out_features} is not a multiple of {VALUES_PER_ITEM}")
        ternary, scale = absmean_ternary(module.weight)
        state[f"{name}.weight"] = pack_weights(ternary).cpu()
        state[f"{name}.weight_scale"] = scale.reshape(1).to(dtype).cpu()
    _, rest = _linear_names(model)
    quant = BitNetQuantConfig(
        linear_class="bitlinear",
        quantization_mode="offline",
        use_rms_norm=use_rms_norm,
        rms_norm_eps=eps if eps is not None else 1e-6,
        # An explicit list replaces transformers' default skips (lm_head among them): name every full-precision
        # linear, or the loader would turn lm_head into a BitLinear too.
        modules_to_not_convert=rest,
    )
    model.save_pretrained(output_dir, state_dict=state)
    # The config written above is the training one; the packed checkpoint needs the offline layout instead.
    config = copy.deepcopy(model.config)
    config.quantization_config = quant.to_dict()
    config.dtype = dtype
    config.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return output_dir


# ---------------------------------------------------------------------------------------------------------------
# The two-stage schedule
# ---------------------------------------------------------------------------------------------------------------
#
# Sources: "The Era of 1-bit LLMs: Training Tips, Code and FAQ" (S. Ma, H. Wang, F. Wei et al., Microsoft, 2024;
# github.com/microsoft/unilm, bitnet/) and the "BitNet b1.58 2B4T Technical Report" (arXiv 2504.12285, sections
# 3.1.1 and 3.1.2). The training tips: a 1-bit model trains stably at a higher learning rate than an FP16 model of
# the same size, and gains from a two-stage schedule that drops the learning rate at mid-training and switches
# weight decay off for the second half. The 2B4T report, quoted: stage 1 "a standard cosine decay schedule ... with
# a relatively high peak learning rate"; stage 2 ("cooldown"), "approximately midway through the planned training
# token count, the learning rate was abruptly decayed and subsequently maintained via a cosine schedule with a
# significantly lower peak value"; weight decay "followed a cosine schedule, reaching a peak value of 0.1" in stage
# 1 and was "effectively disabled (set to zero)" in stage 2. The report's text gives no learning-rate values: the
# peak is the optimizer's lr, chosen by the caller (higher than an FP16 model of that size would use).
#
# What is chosen here, where the sources give no number:
# - stage 1 is the cosine planned over the whole run and cut at the switch (so it ends near half the peak when the
#   switch is at mid-training);
# - stage 2 restarts at stage2_lr_ratio = 0.3 of the peak ("significantly lower" than the ~0.5 it drops from) and
#   decays along a cosine to 0 at the last step;
# - warmup is linear from 0, the convention of transformers' schedules;
# - weight decay stays at 0.1 through stage 1: torch's AdamW decays by lr * weight_decay, so the decay applied
#   already follows stage 1's cosine with the learning rate.


def stage2_start(total_steps: int, stage2_fraction: float = 0.5) -> int:
    """The first optimizer step of stage 2 (0-based): the last `stage2_fraction` of the steps are stage 2."""
    if not 0.0 < stage2_fraction < 1.0:
        raise ValueError(f"stage2_fraction {stage2_fraction}: expected a fraction strictly between 0 and 1")
    return round(total_steps * (1.0 - stage2_fraction))


class TwoStageLR:
    """The learning-rate factor of the two-stage schedule at a step. A callable object rather than a closure, so
    that LambdaLR's state_dict saves its numbers with a checkpoint."""

    def __init__(self, total_steps: int, warmup_steps: int, stage2_fraction: float = 0.5, stage2_lr_ratio: float = 0.3):
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.switch_step = stage2_start(total_steps, stage2_fraction)
        self.stage2_lr_ratio = stage2_lr_ratio
        if not 0 <= warmup_steps < self.switch_step:
            raise ValueError(f"warmup_steps {warmup_steps} must end before stage 2 starts at step {self.switch_step}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        if step < self.switch_step:
            progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        progress = min(1.0, (step - self.switch_step) / max(1, self.total_steps - self.switch_step))
        return self.stage2_lr_ratio * 0.5 * (1.0 + math.cos(math.pi * progress))


def two_stage_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    stage2_fraction: float = 0.5,
    stage2_lr_ratio: float = 0.3,
    weight_decay: float = 0.1,
) -> LambdaLR:
    """LambdaLR for the BitNet b1.58 two-stage recipe (see the comment above for sources and choices).

    Sets the stage-1 weight decay of the parameter groups that decay (weight_decay > 0; the groups a Trainer
    builds with 0, biases and norms, keep 0). Pair it with `DropWeightDecayInStage2`, which sets it to 0 at
    `stage2_start(total_steps, stage2_fraction)`.
    """
    for group in optimizer.param_groups:
        if group.get("weight_decay", 0.0) > 0.0:
            group["weight_decay"] = weight_decay
    return LambdaLR(optimizer, TwoStageLR(total_steps, warmup_steps, stage2_fraction, stage2_lr_ratio))


def apply_stage2_weight_decay(
    optimizer: torch.optim.Optimizer, step: int, total_steps: int, stage2_fraction: float = 0.5
) -> bool:
    """Set every parameter group's weight decay to 0 once `step` (0-based, the update about to run) is in stage 2;
    returns whether it is. For loops without a Trainer: call it before each optimizer.step()."""
    if step < stage2_start(total_steps, stage2_fraction):
        return False
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0
    return True


class DropWeightDecayInStage2(TrainerCallback):
    """Trainer callback: weight decay 0 from the first stage-2 update on (the 2B4T report's stage 2).

    Runs just before each optimizer.step(), when `state.global_step` counts the updates done: the same count the
    LambdaLR has seen, so the weight decay switches on the step the learning rate drops. A run resumed in stage 2
    gets 0 at once (its optimizer state restores the groups' weight decay too, so either way it stays 0).
    """

    def __init__(self, stage2_fraction: float = 0.5):
        self.stage2_fraction = stage2_fraction

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None and state.max_steps > 0:
            apply_stage2_weight_decay(optimizer, state.global_step, state.max_steps, self.stage2_fraction)
