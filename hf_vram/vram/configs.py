"""The model config a recipe trains, without weights: from a local folder or the Hub (config.json only), from the
recipe itself for a model built from scratch, or from hf-vram's table of known bases when offline."""

from __future__ import annotations

from hf_vram.errors import UserError
from hf_vram.recipe.load import LoadedRecipe


class ConfigUnavailable(UserError):
    """The model's config cannot be read (offline, not a known base): nothing can be planned."""


def resolve_config(loaded: LoadedRecipe):
    """The model config of a recipe, with no weights: from the local output or Hub (config.json only), from the
    recipe itself for a model built from scratch, or from hf-vram's table of known bases when offline."""
    from transformers import AutoConfig

    r = loaded.recipe
    if r.model.arch:
        import hf_vram.models  # noqa: F401  (architectures hf-vram adds, RetNet, register with AutoConfig)

        config = AutoConfig.for_model(r.model.arch, **r.model.config)
        if r.tokenizer.train:
            # A char-level vocabulary is the text's distinct characters (65 for Shakespeare): 256 stand for them.
            config.vocab_size = r.tokenizer.vocab_size if r.tokenizer.kind == "bpe" else 256
        elif r.tokenizer.name_or_path:
            config.vocab_size = _tokenizer_size(r.tokenizer.name_or_path, config.vocab_size)
        return config
    if r.task == "assemble":
        from hf_vram.moe.assemble import mixtral_config

        return mixtral_config(_config_of(loaded, r.model.name_or_path), len(r.moe.experts), r.moe.experts_per_token)
    return _config_of(loaded, r.model.name_or_path)


def _config_of(loaded: LoadedRecipe, ref: str):
    """The config of a pretrained model reference: a local folder or Hub id, hf-vram's table of known bases when
    offline, or another recipe's output (planned from that recipe when it is not trained yet)."""
    from transformers import AutoConfig

    from hf_vram.vram.known_configs import KNOWN_CONFIGS

    if ref.startswith("recipe:"):
        from hf_vram.recipe.load import find_recipe, load_recipe

        dep = load_recipe(find_recipe(ref.removeprefix("recipe:"), relative_to=loaded.path.parent))
        if (dep.output_dir / "config.json").is_file():
            return AutoConfig.from_pretrained(dep.output_dir)
        return resolve_config(dep)
    try:
        return AutoConfig.from_pretrained(ref)
    except (OSError, ValueError):
        if ref in KNOWN_CONFIGS:
            fields = dict(KNOWN_CONFIGS[ref])
            return AutoConfig.for_model(fields.pop("model_type"), **fields)
        raise ConfigUnavailable(f"model.name_or_path: cannot read the config of '{ref}' (offline, and not a known base); "
                                "download it once or give a local path") from None


def _tokenizer_size(ref: str, default: int) -> int:
    """len() of a named tokenizer, which sizes a model built from scratch: from a local folder, the table of known
    Hub tokenizers, or the config's own default when neither has it."""
    from pathlib import Path

    from hf_vram.vram.known_configs import KNOWN_TOKENIZER_SIZES

    if Path(ref).expanduser().is_dir():
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(ref))
    return KNOWN_TOKENIZER_SIZES.get(ref, default)
