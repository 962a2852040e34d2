"""Parameters of a model by how training stores them, counted from its config (no weights): written down for the
dense families whose layers are plain (Llama, Mistral, Qwen2), from a model built on the meta device otherwise."""

from __future__ import annotations

from dataclasses import dataclass

from hf_vram.recipe.schema import Recipe


@dataclass
class Counts:
    """Parameters of the model by how they are stored."""

    block_linear: int  # weights of nn.Linear layers inside the blocks (what bitsandbytes quantizes)
    block_linear_rows: int  # their output features summed (8-bit keeps one scale per row)
    other: int  # embeddings, lm_head, norms, biases
    trainable: int  # what the optimizer updates (adapter, or everything)
    total: int
    # Trainable values in tensors under 4,096 elements: bitsandbytes' 8-bit optimizers keep those in fp32.
    trainable_small: int = 0
    # Values of 3-D expert weights (Mixtral-style gate_up_proj / down_proj) that a LoRA adapter wraps, per layer.
    adapted_expert_values: int = 0


# Families counted by hand (_dense_counts), as transformers 5.24's modeling_llama, modeling_mistral and
# modeling_qwen2 build them: building one on the meta device imports torch and that modeling code, seconds of a
# `hf-vram plan` that otherwise answers in a fraction of one. tests/test_plan_speed.py checks the two agree.
DENSE_FAMILIES = ("llama", "mistral", "qwen2")
LORA_TYPES = ("lora", "dora", "rslora")


def count_parameters(config, recipe: Recipe) -> Counts:
    """Exact counts: by hand for the dense families, else from a meta-device model (no memory is allocated)."""
    if config.model_type in DENSE_FAMILIES:
        return _dense_counts(config, recipe)
    return meta_counts(config, recipe)


def _dense_linears(config) -> list[tuple[str, int, int, bool]]:
    """One decoder layer's nn.Linear layers of a Llama, Mistral or Qwen2: (name, in, out, has a bias)."""
    h, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // heads
    i = config.intermediate_size
    llama = config.model_type == "llama"
    qkv_bias = config.model_type == "qwen2" or (llama and config.attention_bias)  # Qwen2: q, k, v biases only
    o_bias = llama and config.attention_bias
    mlp_bias = llama and config.mlp_bias
    return [("q_proj", h, heads * d, qkv_bias), ("k_proj", h, kv * d, qkv_bias), ("v_proj", h, kv * d, qkv_bias),
            ("o_proj", heads * d, h, o_bias), ("gate_proj", h, i, mlp_bias), ("up_proj", h, i, mlp_bias),
            ("down_proj", i, h, mlp_bias)]


def _dense_counts(config, recipe: Recipe) -> Counts:
    """meta_counts of a Llama, Mistral or Qwen2, from the config alone: each layer holds the linears of
    _dense_linears and two RMSNorm weights; the model an embedding, a final norm and an lm_head (one tensor with
    the embedding when tied). Adapter sizes follow peft's layer shapes, as in meta_counts."""
    a = recipe.adapter
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    layer_tensors = [h, h]  # input_layernorm, post_attention_layernorm
    block_linear = rows = adapter = small = 0
    for name, fan_in, fan_out, bias in _dense_linears(config):
        block_linear += fan_in * fan_out
        rows += fan_out
        layer_tensors += [fan_in * fan_out] + ([fan_out] if bias else [])
        if a.type in LORA_TYPES and (a.target_modules == "all-linear" or name in a.target_modules):
            shapes = [a.r * fan_in, a.r * fan_out] + ([fan_out] if a.type == "dora" else [])
            adapter += sum(shapes)
            small += sum(n for n in shapes if n < 4096)
    block_linear, rows, adapter, small = (n * layers for n in (block_linear, rows, adapter, small))
    tensors = layer_tensors * layers + [vocab * h, h] + ([] if config.tie_word_embeddings else [vocab * h])
    total = sum(tensors)
    if a.type == "llama-adapter":
        adapter = min(a.prompt_layers, layers) * (a.prompt_length * h + 1)
        small = adapter if a.prompt_length * h < 4096 else 0
    elif a.type == "none":
        small = sum(n for n in tensors if n < 4096)
    trainable = total if a.type == "none" else adapter
    return Counts(block_linear, rows, total - block_linear, trainable, total + (adapter if a.type != "none" else 0), small)


def meta_counts(config, recipe: Recipe) -> Counts:
    """Exact counts from a meta-device model (no memory is allocated). Adapter sizes follow peft's layer shapes
    (importing peft would pull in bitsandbytes and double the time `plan` takes)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    a = recipe.adapter
    targets = a.target_modules
    block_linear = rows = adapter = small = 0
    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if isinstance(module, Conv1D):  # GPT-2's linear layers, stored transposed; bitsandbytes quantizes them too
            module.in_features, module.out_features = module.weight.shape
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head:
            block_linear += module.weight.numel()
            rows += module.out_features
            if a.type in LORA_TYPES and (targets == "all-linear" or name.rsplit(".", 1)[-1] in targets):
                # LoRA A (r x in) and B (out x r); DoRA adds a magnitude per output.
                shapes = [a.r * module.in_features, a.r * module.out_features] + ([module.out_features] if a.type == "dora" else [])
                adapter += sum(shapes)
                small += sum(n for n in shapes if n < 4096)
    experts = _adapted_experts(model, a)
    adapter += sum(n for n, _ in experts.values())
    small += sum(n for n, _ in experts.values() if n < 4096)
    expert_values = sum(v for _, v in experts.values()) // max(config.num_hidden_layers, 1)
    if a.type == "llama-adapter":
        # peft's adaption prompt: prompt_length x hidden values and one gate per adapted layer.
        adapter = min(a.prompt_layers, config.num_hidden_layers) * (a.prompt_length * config.hidden_size + 1)
    # Tied embeddings are one tensor: parameters() yields it once.
    total = sum(p.numel() for p in model.parameters())
    if a.type == "none":
        small = sum(p.numel() for p in model.parameters() if p.numel() < 4096)
    elif a.type == "llama-adapter":
        small = adapter if a.prompt_length * config.hidden_size < 4096 else 0
    trainable = total if a.type == "none" else adapter
    return Counts(block_linear, rows, total - block_linear, trainable, total + (adapter if a.type != "none" else 0), small,
                  expert_values)


def _adapted_experts(model, adapter) -> dict[str, tuple[int, int]]:
    """LoRA on a mixture of experts' 3-D weights and router (peft's ParamWrapper, which all-linear reaches in
    transformers' Mixtral-style blocks): {parameter name: (adapter parameters, wrapped values)}. peft gives each
    expert its own rank-r pair (A: r*E x in, B: out x r*E) and doubles the rank of the fused gate_up_proj (it
    stands for w1 and w3); the router's 2-D weight gets a plain rank-r pair."""
    if adapter.type not in LORA_TYPES or adapter.target_modules != "all-linear":
        return {}
    found = {}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() == 3 and leaf in ("gate_up_proj", "down_proj"):
            e, out, inp = p.shape
            r = adapter.r * (2 if leaf == "gate_up_proj" else 1)
            found[name] = (r * e * (inp + out), p.numel())
        elif p.dim() == 2 and name.endswith("mlp.gate.weight") and p.shape[0] == getattr(model.config, "num_local_experts", -1):
            found[name] = (adapter.r * sum(p.shape), 0)
    return found
