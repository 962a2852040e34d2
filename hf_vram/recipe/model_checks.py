"""Recipe values checked against the model's config, without weights: the LoRA rank against the widths of the
layers it adapts, LLaMA-Adapter's layers against the model's, and data.max_length against a position table the
model cannot read past.

The config comes from hf_vram.vram.configs.resolve_config: a local folder's or the Hub's config.json (the Hub
asked under a short deadline), the recipe itself for a model built from scratch (a recipe:NAME dependency planned
from its own recipe), or hf-vram's table of known bases. Where none of them has it (offline, not a known base),
nothing is checked here, so that `hf-vram validate` still works without a network.
"""

from __future__ import annotations

import contextlib
import io
import sys
from typing import Any

from hf_vram.errors import RecipeError, UserError
from hf_vram.recipe.load import LoadedRecipe
from hf_vram.tasks import task_of

LORA_TYPES = ("lora", "dora", "rslora")

# Model types whose positions come from a table of fixed size: a token past its last row has no position, and the
# forward pass fails (an index error in the embedding lookup). model_type -> (config field of its size, why).
# Rotary (Llama, Mistral, Qwen2, GPT-NeoX, ...) and ALiBi models compute positions on the fly and are not here:
# they run past max_position_embeddings, and recipes may train longer on purpose (with RoPE scaling).
POSITION_TABLES = {
    "gpt2": ("n_positions", "a learned position table"),
    "gpt_bigcode": ("n_positions", "a learned position table"),
    "openai-gpt": ("n_positions", "a learned position table"),
    "gpt_neo": ("max_position_embeddings", "a learned position table"),
    "opt": ("max_position_embeddings", "a learned position table"),
    "biogpt": ("max_position_embeddings", "a learned position table"),
    "ctrl": ("n_positions", "a sinusoidal table of that many rows, computed once"),
    # No positions at all, but transformers' RWKV CUDA kernel, which it uses on GPUs, refuses longer sequences.
    "rwkv": ("context_length", "the RWKV CUDA kernel takes at most that many tokens per forward"),
}

# Model types peft's adaption prompt (LLaMA-Adapter) supports: peft.tuners.adaption_prompt.config's
# TRANSFORMERS_MODEL_CONFIG (tests/test_bad_recipes.py checks the two agree), written out so that validating a
# recipe does not import peft and torch.
ADAPTION_PROMPT_TYPES = ("llama", "mistral", "gpt2")


def check_against_model(loaded: LoadedRecipe) -> None:
    """Raise RecipeError, naming the file (or command line) and the key, for values of a language-model recipe that
    its model's config rules out. Prints a note (stderr) for a sequence longer than a rotary model's trained
    context. Recipes of other tasks, and models whose config cannot be had, are left alone."""
    recipe = loaded.recipe
    if not task_of(recipe).language_model or recipe.data is None:
        return
    config = _model_config(loaded)
    if config is None:
        return
    problems = _check_adapter(loaded, config) + _check_length(loaded, config)
    if problems:
        raise RecipeError(str(loaded.path), problems)


def _at(loaded: LoadedRecipe, key: str) -> str:
    return loaded.origins.get(key, str(loaded.path))


def _model_name(loaded: LoadedRecipe) -> str:
    model = loaded.recipe.model
    return model.name_or_path or f"the {model.arch} built from model.config"


def _model_config(loaded: LoadedRecipe) -> Any:
    """The model's config, or None when it cannot be had. A model built from scratch gets transformers' config
    class, which also checks the values of model.config (hidden_size a multiple of the heads, ...)."""
    from hf_vram.vram.configs import resolve_config

    from_scratch = bool(loaded.recipe.model.arch)
    try:
        # resolve_config's notices ("planning X from hf-vram's known config") are about plans; here that config is
        # simply the one checked against.
        with contextlib.redirect_stderr(io.StringIO()):
            return resolve_config(loaded, light=not from_scratch)
    except UserError:
        return None  # offline and not a known base, or a recipe:NAME dependency that is invalid (validated itself)
    except Exception as e:
        if not from_scratch:
            return None  # a pretrained model's own config.json: loading it says what is wrong with it
        raise RecipeError(str(loaded.path), [
            f"{_at(loaded, 'model.config')}: model.config: the {loaded.recipe.model.arch} config class refuses these "
            f"values: {_last_line(e)}"
        ]) from None


def _last_line(e: Exception) -> str:
    """The reason of a config class's error: its last line, without the exception name transformers puts in."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    head, sep, rest = lines[-1].partition(": ")
    return rest if sep and head.endswith(("Error", "Exception")) else lines[-1]


def _layer_widths(config: Any) -> dict[str, int]:
    """The smaller side of each linear layer LoRA can adapt, by Llama-style module name, from the shape fields the
    config has; a module not named here counts as hidden_size wide."""
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(hidden, int):
        return {}
    widths = {}
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(heads, int) and heads > 0:
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        widths.update(q_proj=min(hidden, heads * head_dim), o_proj=min(hidden, heads * head_dim),
                      k_proj=min(hidden, kv_heads * head_dim), v_proj=min(hidden, kv_heads * head_dim))
    intermediate = getattr(config, "intermediate_size", None)
    if isinstance(intermediate, int) and intermediate > 0:
        widths.update(gate_proj=min(hidden, intermediate), up_proj=min(hidden, intermediate),
                      down_proj=min(hidden, intermediate))
    return {"hidden_size": hidden, **widths}


def _check_adapter(loaded: LoadedRecipe, config: Any) -> list[str]:
    adapter = loaded.recipe.adapter
    if adapter.type in LORA_TYPES:
        return _check_rank(loaded, config)
    if adapter.type == "llama-adapter":
        return _check_adaption_prompt(loaded, config)
    return []


def _check_rank(loaded: LoadedRecipe, config: Any) -> list[str]:
    """adapter.r at most the smaller side of every adapted layer: the update B @ A of a layer has rank at most that,
    so a larger r only adds parameters and memory."""
    adapter = loaded.recipe.adapter
    widths = _layer_widths(config)
    if not widths:
        return []
    if adapter.target_modules == "all-linear":
        targets = widths
    else:
        targets = {name: widths.get(name, widths["hidden_size"]) for name in adapter.target_modules}
    if not targets:
        return []
    layer, width = min(targets.items(), key=lambda item: item[1])
    if adapter.r <= width:
        return []
    side = "hidden_size" if layer == "hidden_size" else f"{layer}'s smaller side"
    return [f"{_at(loaded, 'adapter.r')}: adapter.r: {adapter.r} is more than {_model_name(loaded)} has room for "
            f"({side} is {width}): a LoRA update of that layer has rank at most {width}, so a larger r adds "
            f"parameters and memory but nothing it can learn; set adapter.r <= {width}"]


def _check_adaption_prompt(loaded: LoadedRecipe, config: Any) -> list[str]:
    adapter = loaded.recipe.adapter
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTION_PROMPT_TYPES:
        return [f"{_at(loaded, 'adapter.type')}: adapter.type: llama-adapter (peft's adaption prompt) supports model "
                f"types {', '.join(ADAPTION_PROMPT_TYPES)}, and {_model_name(loaded)} is {model_type}: use "
                "adapter.type: lora"]
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and adapter.prompt_layers > layers:
        return [f"{_at(loaded, 'adapter.prompt_layers')}: adapter.prompt_layers: {adapter.prompt_layers} is more than "
                f"the {layers} layers of {_model_name(loaded)}; set adapter.prompt_layers <= {layers}"]
    return []


def _check_length(loaded: LoadedRecipe, config: Any) -> list[str]:
    """data.max_length against a position table the model cannot read past (an error), or past the trained
    context of a rotary model (a note: RoPE runs past it)."""
    recipe = loaded.recipe
    length = recipe.data.max_length
    model_type = getattr(config, "model_type", None)
    if model_type in POSITION_TABLES:
        field, why = POSITION_TABLES[model_type]
        limit = getattr(config, field, None)
        if not isinstance(limit, int) or length <= limit:
            return []
        raise_it = f" or raise model.config.{field}" if recipe.model.arch else ""
        return [f"{_at(loaded, 'data.max_length')}: data.max_length: {length:,} tokens is more than "
                f"{_model_name(loaded)} can read ({field} {limit:,}: {why}); set data.max_length <= {limit}{raise_it}"]
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and length > limit and _context_is_known(loaded):
        print(f"[hf-vram] note: {loaded.path}: {_rotary_note(loaded, config, length, limit)}", file=sys.stderr)
    return []


def _context_is_known(loaded: LoadedRecipe) -> bool:
    """Whether the config's max_position_embeddings is the model's own: hf-vram's table of known bases keeps shape
    fields only, so a base planned from it has its config class's default there (Llama's 2,048 for Llama-3.1's
    131,072); a recipe:NAME dependency's may be such a one too."""
    from hf_vram.vram.known_configs import KNOWN_CONFIGS

    ref = loaded.recipe.model.name_or_path
    if not ref:
        return True  # built from scratch: model.config, or its class's default, is what the model gets
    if ref.startswith("recipe:"):
        return False
    return ref not in KNOWN_CONFIGS or "max_position_embeddings" in KNOWN_CONFIGS[ref]


def _rotary_note(loaded: LoadedRecipe, config: Any, length: int, limit: int) -> str:
    if loaded.recipe.model.arch:
        return (f"data.max_length {length:,} is past model.config.max_position_embeddings {limit:,}: the model is "
                "trained at data.max_length anyway (its positions are computed, not a table), but generation and "
                "the saved config read max_position_embeddings: set it to data.max_length")
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    scaled = isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type", "default")) != "default"
    hint = "" if scaled else "; a model trained this far past it usually needs RoPE scaling (a long-context base)"
    return (f"data.max_length {length:,} is past {_model_name(loaded)}'s max_position_embeddings {limit:,} (the "
            f"context it was trained at): its rotary positions run past it{hint}")
