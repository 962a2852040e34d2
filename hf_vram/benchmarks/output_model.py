"""An output directory as a model in memory, loaded the way hf-vram scores it while training (hf_vram/runners/lm.py
scores the model it trains, in memory): an adapter on its base as the recipe's own builder loads that base
(hf_vram/builders/model.py: the recipe's 4- or 8-bit bitsandbytes quantization on the CPU or the GPU, its attention
kernel, embeddings sized to the saved tokenizer), then the saved adapter; a full model (trained in full, merged, or
assembled) as it is saved."""

from __future__ import annotations

import json
from pathlib import Path

from hf_vram.errors import UserError
from hf_vram.recipe.load import LoadedRecipe


def read_output(out: Path) -> LoadedRecipe:
    """The recipe an output was trained with (its recipe.yaml); an error naming the fix when `out` is not a language
    model's output."""
    from hf_vram.recipe.load import load_recipe

    out = Path(out)
    if not out.is_dir():
        raise UserError(f"{out}: no such directory; give an output directory of `hf-vram train` (outputs/NAME)")
    if not (out / "recipe.yaml").is_file():
        raise UserError(f"{out} is not an hf-vram output (no recipe.yaml): give the directory `hf-vram train` wrote "
                        "(outputs/NAME, or the recipe's train.output_dir)")
    # Read as saved (its recipe:NAME references are not looked up again: the weights are here).
    loaded = load_recipe(out / "recipe.yaml", check_references=False)
    if loaded.recipe.task == "diffusion":
        raise UserError(f"{out} is an image model (task diffusion): lm-eval evaluates language models")
    if not any((out / f).is_file() for f in ("adapter_config.json", "config.json")):
        raise UserError(f"{out} holds no model yet (no adapter_config.json or config.json): training has not saved "
                        f"it; finish it with `hf-vram train` (it resumes)")
    return loaded


def load_output(out: Path, loaded: LoadedRecipe | None = None):
    """(recipe, model, tokenizer) of an output directory (its recipe read_output read already, or read now), the
    model in eval mode on the GPU when there is one."""
    from transformers import AutoTokenizer

    loaded = loaded or read_output(out)
    # The output's own tokenizer: the one it was trained with (chat template and added tokens included).
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    if (Path(out) / "adapter_config.json").is_file():
        model = _adapter_on_base(Path(out), loaded, tokenizer)
    else:
        model = _full_model(Path(out), loaded)
    return loaded, _on_device(model).eval(), tokenizer


def _adapter_on_base(out: Path, loaded: LoadedRecipe, tokenizer):
    from peft import PeftModel

    from hf_vram.builders.model import build_model

    base = json.loads((out / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{out}/adapter_config.json names no base model (base_model_name_or_path is empty)")
    if base.startswith(("/", ".", "~")) and not Path(base).expanduser().is_dir():
        raise UserError(f"base model {base} (from {out}/adapter_config.json) not found: restore it there, or edit "
                        "base_model_name_or_path to where it is now")
    # wrap=False: the base as training built it (quantized, prepared), without a new untrained adapter.
    model, _ = build_model(loaded.recipe, tokenizer, base, wrap=False)
    return PeftModel.from_pretrained(model, str(out))


def _full_model(out: Path, loaded: LoadedRecipe):
    from transformers import AutoConfig, AutoModelForCausalLM

    from hf_vram.builders.model import attention_for

    config = AutoConfig.from_pretrained(str(out))
    if config.model_type == "bitnet":
        from hf_vram.models.bitnet import load_training_model

        try:
            # The fp32 masters in BitNet's training layers, the model the run trained and scored.
            return load_training_model(out)
        except ValueError:
            pass  # a packed ternary export: transformers loads it itself
    attention = attention_for(config, loaded.recipe.model.attn_implementation)
    return AutoModelForCausalLM.from_pretrained(str(out), dtype="auto", attn_implementation=attention)


def _on_device(model):
    """A model loaded on the CPU moves to the GPU when there is one (a quantized base is placed there already)."""
    import torch

    if torch.cuda.is_available() and next(model.parameters()).device.type == "cpu":
        return model.to("cuda")
    return model
