"""model section (+ quant, adapter) -> a transformers model ready to train.

From scratch: the architecture's config class filled from the recipe, sized to the tokenizer.
Pretrained: from_pretrained, quantized by bitsandbytes when the recipe asks, prepared for k-bit training,
then wrapped in a peft adapter.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

import hf_vram.models  # noqa: F401  (architectures hf-vram adds, RetNet, register with the Auto classes)
from hf_vram.builders.adapter import adapter_config
from hf_vram.builders.quant import bnb_config, sharded_launch
from hf_vram.device import has_cuda, torch_dtype
from hf_vram.recipe.schema import Recipe


def scratch_config(recipe: Recipe, tokenizer) -> PretrainedConfig:
    """The recipe's architecture config, with the vocabulary and special tokens of its tokenizer."""
    config = AutoConfig.for_model(recipe.model.arch, **recipe.model.config)
    config.vocab_size = len(tokenizer)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, name, getattr(tokenizer, name))
    return config


def attention_for(config: PretrainedConfig, requested: str) -> str | None:
    """The attention kernel to ask transformers for: attention-free models (Mamba, Mamba2, RWKV) refuse sdpa, the
    default, so they get none; an explicit flash_attention_2 on such a model is still refused by transformers.
    transformers 5.24's refusal: tests/test_library_workarounds.py::test_attention_free_models_refuse_sdpa."""
    cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if requested == "sdpa" and cls is not None and not getattr(cls, "_supports_sdpa", True):
        return None
    return requested


def scan_path(config: PretrainedConfig) -> str | None:
    """Which selective-scan implementation a Mamba model trains with, for the log: mamba-ssm's CUDA kernels when
    the package is installed and a GPU is there, transformers' pure-torch scan otherwise (slower, more memory)."""
    if config.model_type not in ("mamba", "mamba2"):
        return None
    import importlib.util

    if has_cuda() and importlib.util.find_spec("mamba_ssm") and importlib.util.find_spec("causal_conv1d"):
        return f"{config.model_type}: mamba-ssm's CUDA kernels (selective scan, causal conv1d)"
    why = "no GPU" if not has_cuda() else "mamba-ssm / causal-conv1d not installed (pip install mamba-ssm causal-conv1d)"
    return f"{config.model_type}: transformers' pure-torch scan ({why}): slower, and more activation memory"


def local_or_hub(ref: str) -> str:
    """Absolute path for local directories, so that adapters saved later point at their base from anywhere."""
    p = Path(ref).expanduser()
    return str(p.resolve()) if p.exists() else ref


def build_model(recipe: Recipe, tokenizer, model_path: str | None, added_token_ids=(), wrap: bool = True):
    """(model, peft config): the model to train, built from scratch or loaded (quantized), wrapped in the recipe's
    adapter unless wrap is False (trl's DPOTrainer wraps it itself, so that its reference model is the base with
    the adapter switched off). added_token_ids are tokens a chat template added to the tokenizer: their rows
    train beside the adapter even where the embedding matrix had spare rows for them."""
    m = recipe.model
    if m.arch:
        torch.manual_seed(recipe.train.seed)
        config = scratch_config(recipe, tokenizer)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention_for(config, m.attn_implementation))
        if config.model_type == "bitnet":
            from hf_vram.models.bitnet import to_bitlinear

            # Ternary training layers (fp32 masters quantised in every forward). BitNet's blocks already norm the
            # inputs of o_proj and down_proj (its sub-norms), as the b1.58 models do: no extra norm per layer.
            to_bitlinear(model, use_rms_norm=False)
        if getattr(model, "loss_type", None) is None:
            # Some models (GPT-2) leave it unset; the Trainer then divides the summed loss by every label, T per
            # row, where a causal LM predicts T - 1: the loss and gradients would be scaled by (T - 1) / T.
            # transformers 5.24; tests/test_library_workarounds.py fails once GPT-2 sets it or the Trainer's
            # count no longer depends on it.
            model.loss_type = "ForCausalLM"
    else:
        quant = bnb_config(recipe.quant)
        kwargs = {}
        if quant is not None:
            kwargs["quantization_config"] = quant
            kwargs["dtype"] = quant.bnb_4bit_compute_dtype if recipe.quant.bits == 4 else torch_dtype(m.dtype)
            # DDP: each process holds its own full copy of the quantized base on its own GPU. FSDP and
            # DeepSpeed place (and shard) the weights themselves and refuse a device_map.
            if not sharded_launch():
                kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))} if has_cuda() else {"": "cpu"}
        else:
            # A frozen base under an adapter can sit in bf16; fully trained weights stay fp32 (mixed precision
            # runs the matmuls in bf16/fp16 while AdamW updates fp32 masters).
            kwargs["dtype"] = torch_dtype(m.dtype) if recipe.adapter.type != "none" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(
            local_or_hub(model_path), attn_implementation=m.attn_implementation, **kwargs
        )
        if quant is not None:
            from peft import prepare_model_for_kbit_training

            if not has_cuda():
                keep_4bit_layout_for_training(model)

            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=recipe.train.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
    model.memory_savings = apply_memory_savings(model, recipe, has_cuda())
    new_token_ids = sorted(set(grow_vocabulary(model, tokenizer)) | set(added_token_ids))
    set_stop_tokens(model.generation_config, tokenizer)
    adapter = recipe.adapter
    if adapter.type == "llama-adapter":
        # The paper adapts the top 30 of 32 layers; a smaller model gets all of its layers at most.
        adapter = adapter.model_copy(update={"prompt_layers": min(adapter.prompt_layers, model.config.num_hidden_layers)})
    peft_config = adapter_config(adapter, new_token_ids, bool(getattr(model.config, "tie_word_embeddings", False)))
    if peft_config is not None and wrap:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    return model, peft_config


def apply_memory_savings(model, recipe: Recipe, cuda: bool) -> list[str]:
    """The recipe's memory savings on a built model, before any adapter: unquantized weights of a 4-bit or 8-bit
    base back in the compute dtype, liger-kernel's fused RMSNorm / RoPE / SwiGLU, tiled MLPs. Returns what was
    applied, for the log."""
    from hf_vram.builders.long_context import liger_on

    done = []
    compute = torch_dtype(recipe.quant.compute_dtype)
    if recipe.quant.bits and recipe.quant.unquantized_dtype == "compute" and compute != torch.float32:
        done.append(f"unquantized weights in {cast_unquantized(model, compute)}")
        if cuda:
            torch.cuda.empty_cache()  # the fp32 copies peft made are freed: give their blocks back
    if liger_on(recipe, cuda):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
            if recipe.train.kernels == "liger":
                from hf_vram.errors import UserError

                raise UserError(f"train.kernels: liger-kernel has no kernels for {model.config.model_type}; set "
                                "train.kernels=auto (the model's own kernels)")
            return done + _tile(model, recipe)

        # The loss stays trl's fused LM head (train.fused_loss); liger's own fused cross-entropy would replace the
        # model's forward that trl patches.
        _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
        done.append("liger-kernel RMSNorm, RoPE and gated-MLP kernels")
    return done + _tile(model, recipe)


def _tile(model, recipe: Recipe) -> list[str]:
    from hf_vram.builders.long_context import tiled_mlp_on

    if not tiled_mlp_on(recipe):
        return []
    from hf_vram.train.tiled_mlp import tile_mlps

    if tile_mlps(model):
        return [f"tiled MLP ({model.config.hidden_size} tokens per tile)"]
    if recipe.train.tiled_mlp is True:
        from hf_vram.errors import UserError

        raise UserError(f"train.tiled_mlp: {model.config.model_type} has no Llama-style gated MLP "
                        "(gate_proj, up_proj, down_proj) to tile; set train.tiled_mlp=false")
    return []  # auto: nothing to tile in this architecture


def cast_unquantized(model, dtype: torch.dtype) -> str:
    """peft's prepare_model_for_kbit_training (0.21) casts every weight bitsandbytes left unquantized to fp32, for
    stability: on Llama-3 that is 4.2 GB of embeddings and LM head. The compute dtype is enough for frozen weights
    (RMSNorm computes its statistics in fp32 whatever the weight's dtype), and it keeps the residual stream, and so
    every checkpointed activation, in bf16 instead of fp32. tests/test_long_context.py
    (test_peft_still_casts_unquantized_weights_to_fp32) fails if peft stops casting, and this can go."""
    for p in model.parameters():
        if p.dtype == torch.float32 and type(p).__name__ not in ("Params4bit", "Int8Params"):
            p.data = p.data.to(dtype)
    return str(dtype).removeprefix("torch.")


def set_stop_tokens(generation_config, tokenizer) -> None:
    """Generation stops at EOS, at the stops the model already has (Llama-3-Instruct's <|eot_id|>), and at
    ChatML's <|im_end|> when the tokenizer has it. Also used when a merged model is saved (hf_vram/merge.py)."""
    if tokenizer.pad_token_id is not None:
        generation_config.pad_token_id = tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        return
    known = generation_config.eos_token_id
    stops = {tokenizer.eos_token_id, *(known if isinstance(known, list) else [known] if known is not None else [])}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end is not None and im_end != tokenizer.unk_token_id:
        stops.add(im_end)
    generation_config.eos_token_id = sorted(stops) if len(stops) > 1 else tokenizer.eos_token_id


def expose_bias_of_trainable_tokens(model) -> None:
    """trl's fused LM head (trl 1.16) reads `lm_head.weight` and `lm_head.bias` directly. peft's
    TrainableTokensWrapper (peft 0.21; new tokens' rows of an untied output layer) answers `.weight` with the
    merged weights, which carry the trained rows, but not `.bias`, so the fused forward fails; the bias is the
    wrapped layer's own. Both behaviours: tests/test_library_workarounds.py."""
    from peft.utils.other import TrainableTokensWrapper

    for module in model.modules():
        if isinstance(module, TrainableTokensWrapper):
            # Straight into __dict__: nn.Module would register a Parameter a second time under the wrapper.
            module.__dict__["bias"] = getattr(module.original_module, "bias", None)


def grow_vocabulary(model, tokenizer) -> list[int]:
    """Resize the embeddings to a tokenizer that gained tokens (a chat template's); returns the new ids.
    New rows start at the mean of the old ones (transformers' mean resizing), a neutral starting point."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return []
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    return list(range(rows, len(tokenizer)))


def keep_4bit_layout_for_training(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    bitsandbytes (0.50) repacks a Linear4bit's weight in place at its first eval-mode, no-grad forward on a CPU
    with AVX512-BF16, and the training backward does not undo it: after one generate() (the score before
    training), the next step's gradients were wrong (grad norm 1.6 instead of 8.7 on the same batch) and the
    adapter learned far less. A model that is trained keeps the training layout. tests/test_library_workarounds.py
    checks that bitsandbytes still repacks (on CPUs with AVX512-BF16) and that this switch still prevents it.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def trainable_and_total(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their logical number of parameters."""
    trainable = total = 0
    for p in model.parameters():
        quant_state = getattr(p, "quant_state", None)
        n = quant_state.shape.numel() if quant_state is not None else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
