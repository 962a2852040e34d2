"""The launch configs shipped under recipes/accelerate/, checked by accelerate's own config class."""

from __future__ import annotations

from pathlib import Path

import yaml

from hf_vram.errors import RecipeError, did_you_mean


def is_accelerate_config(ref: str) -> bool:
    p = Path(ref)
    if not p.is_file():
        return False
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return False  # reported, with its line (or its first byte that is not UTF-8), by the recipe loader
    return isinstance(data, dict) and "compute_environment" in data


def validate_accelerate_config(ref: str) -> str:
    from accelerate.commands.config.config_args import ClusterConfig

    data = yaml.safe_load(Path(ref).read_text(encoding="utf-8"))
    known = set(ClusterConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(ref, [f"{k}: unknown accelerate config key{did_you_mean(k, known)}" for k in unknown])
    try:
        config = ClusterConfig.from_yaml_file(ref)
    except (ValueError, TypeError) as e:
        raise RecipeError(ref, [f"not a valid accelerate config: {e}"]) from None
    return f"ok: {ref} (accelerate launch config: {config.distributed_type.value}, {config.num_processes} processes)"
