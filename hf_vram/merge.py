"""`hf-vram merge`: fold a trained adapter into its base and save a plain transformers model.

The base is always reloaded unquantized on the CPU, even when the adapter was trained on a 4-bit or 8-bit
bitsandbytes base: merging into bitsandbytes layers means dequantize, add, quantize again, which rounds most
of the small LoRA delta away and leaves a quantized model. The result loads with `pipeline("text-generation", model=DEST)` and no peft installed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from hf_vram.errors import UserError
from hf_vram.output.cards.merged import merged_card

if TYPE_CHECKING:
    import torch

DTYPES = ("bfloat16", "float16", "float32")
# peft methods that live beside the weights (extra tokens, prompts, attention gates) rather than in them.
UNMERGEABLE = {
    "ADAPTION_PROMPT": "an adaption prompt (LLaMA-Adapter) adds gated prompt tokens to the attention layers",
    "PROMPT_TUNING": "prompt tuning prepends learned virtual tokens to every input",
    "MULTITASK_PROMPT_TUNING": "prompt tuning prepends learned virtual tokens to every input",
    "P_TUNING": "p-tuning prepends learned virtual tokens to every input",
    "PREFIX_TUNING": "prefix tuning prepends learned key/value states to every layer",
    "CPT": "context-aware prompt tuning prepends learned virtual tokens to every input",
}


def merge_adapter(output_dir: Path, dest: Path | None = None, dtype: str = "auto", max_shard_size: str = "5GB") -> Path:
    """Merge the adapter in OUTPUT_DIR into its base and save the full model (+ tokenizer, card, recipe) to dest."""
    output_dir = Path(output_dir)
    adapter_config = _adapter_config(output_dir)
    base_ref = _base_ref(output_dir, adapter_config)
    dest = Path(dest) if dest is not None else output_dir / "merged"
    _check_dest(dest, output_dir, base_ref)
    # Imported once the input is known to be mergeable, so that mistakes are reported at once.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_config = _base_config(base_ref, output_dir)
    torch_dtype = _resolve_dtype(dtype, base_config)
    tokenizer = _load_tokenizer(output_dir, base_ref)
    # No quantization_config is passed, so the base loads in full precision even when the recipe trained it in
    # 4/8 bits: the adapter was trained against those weights dequantized, which is what merging adds to.
    base = AutoModelForCausalLM.from_pretrained(base_ref, config=base_config, dtype=torch_dtype)
    _match_vocabulary(base, tokenizer, output_dir, adapter_config)

    model = PeftModel.from_pretrained(base, str(output_dir), low_cpu_mem_usage=True)
    try:
        # safe_merge checks every merged weight for NaN/inf before it replaces the original.
        model = model.merge_and_unload(safe_merge=True)
    except (AttributeError, NotImplementedError, TypeError) as e:
        raise UserError(f"{output_dir}: peft cannot merge this {adapter_config.get('peft_type')} adapter: {e}") from e
    # Weights that peft loads whole from the adapter (resized embeddings, modules_to_save) replace the base's
    # tensors in the adapter's own dtype (fp32 when trained in fp32); one cast makes the saved model uniform.
    model = model.to(torch_dtype)
    model.eval()
    _set_generation_config(model, tokenizer, output_dir)

    staging = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(staging)
        if (output_dir / "recipe.yaml").is_file():
            shutil.copy2(output_dir / "recipe.yaml", staging / "recipe.yaml")
        merged_card(output_dir, base_ref, adapter_config, torch_dtype).save(staging / "README.md")
        _replace_dir(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _adapter_config(output_dir: Path) -> dict:
    path = output_dir / "adapter_config.json"
    if not output_dir.is_dir():
        raise UserError(f"{output_dir}: no such directory")
    if not path.is_file():
        if (output_dir / "config.json").is_file():
            raise UserError(f"{output_dir} is already a full model (config.json, no adapter_config.json): nothing to merge")
        raise UserError(f"{output_dir} is not an output (no adapter_config.json): run hf-vram train first")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); it is written by peft's save_pretrained") from e
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type in UNMERGEABLE:
        # transformers' own adapter loading (pipeline(model=DIR)) refuses these methods too; peft's Auto class runs them.
        raise UserError(
            f"{output_dir}: an adapter of type {peft_type} cannot be merged into the weights: {UNMERGEABLE[peft_type]}. "
            "It stays an adapter: load it with peft.AutoPeftModelForCausalLM.from_pretrained"
            f"('{output_dir}') and generate from that"
        )
    return config


def _base_ref(output_dir: Path, adapter_config: dict) -> str:
    ref = adapter_config.get("base_model_name_or_path")
    if not ref:
        raise UserError(f"{output_dir}/adapter_config.json names no base model (base_model_name_or_path is empty)")
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"base model {ref} (from {output_dir}/adapter_config.json) has no config.json")
        return str(path)
    # hf-vram saves local bases as absolute paths; a Hub id is owner/name (or a bare legacy name like gpt2).
    if path.is_absolute() or ref.startswith((".", "~")) or ref.count("/") > 1:
        raise UserError(
            f"base model {ref} (from {output_dir}/adapter_config.json) not found: restore it there, or edit "
            "base_model_name_or_path to where it is now"
        )
    return ref


def _check_dest(dest: Path, output_dir: Path, base_ref: str) -> None:
    resolved = dest.resolve()
    if resolved == output_dir.resolve() or resolved == Path(base_ref).expanduser().resolve():
        raise UserError(f"--out {dest}: choose a new folder, not the adapter or its base")
    if dest.exists() and any(dest.iterdir()) and not _is_earlier_merge(dest):
        raise UserError(f"--out {dest} exists and is not an earlier merge: choose a new folder or remove it")


def _is_earlier_merge(path: Path) -> bool:
    if not (path / "config.json").is_file() or not (path / "README.md").is_file():
        return False
    from huggingface_hub import ModelCard

    try:
        return "merged" in (ModelCard.load(path / "README.md", ignore_metadata_errors=True).data.tags or [])
    except Exception:
        return False


def _base_config(base_ref: str, output_dir: Path):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base_ref)
    except OSError as e:
        raise UserError(
            f"base model {base_ref} (from {output_dir}/adapter_config.json) not found locally nor loadable from the Hub: {e}"
        ) from e
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise UserError(
            f"the base {base_ref} is saved quantized ({method}): merging needs its full-precision weights; "
            f"point base_model_name_or_path in {output_dir}/adapter_config.json at them"
        )
    return config


def _resolve_dtype(choice: str, config) -> torch.dtype:
    import torch

    if choice != "auto":
        if choice not in DTYPES:
            raise UserError(f"--dtype {choice}: expected auto, {', '.join(DTYPES)}")
        return getattr(torch, choice)
    declared = str(getattr(config, "dtype", None) or "").removeprefix("torch.")
    # Configs that name no dtype (or an exotic one) were saved in fp32, the transformers default.
    return getattr(torch, declared) if declared in DTYPES else torch.float32


def _load_tokenizer(output_dir: Path, base_ref: str):
    from transformers import AutoTokenizer

    has_own = any((output_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    return AutoTokenizer.from_pretrained(str(output_dir) if has_own else base_ref)


def _adapter_shapes(output_dir: Path) -> dict[str, list[int]]:
    """Tensor name -> shape of the saved adapter, read from the safetensors header only."""
    path = output_dir / "adapter_model.safetensors"
    if not path.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def _saved_rows(shapes: dict[str, list[int]], module_name: str | None) -> int | None:
    """Rows of a full embedding / lm_head matrix the adapter saved for module_name, if any."""
    if not module_name:
        return None
    rows = [
        shape[0]
        for key, shape in shapes.items()
        if f".{module_name}." in f".{key}" and key.endswith(".weight") and "lora_" not in key and len(shape) == 2
    ]
    return max(rows) if rows else None


def _module_name(model, module) -> str | None:
    if module is None:
        return None
    return next((name for name, m in model.named_modules() if m is module), None)


def _token_indices(adapter_config: dict, module_name: str | None) -> set[int]:
    spec = adapter_config.get("trainable_token_indices")
    if isinstance(spec, list):
        return set(spec)
    if isinstance(spec, dict) and module_name:
        return {i for key, ids in spec.items() if module_name.endswith(key) for i in ids}
    return set()


def _match_vocabulary(base, tokenizer, output_dir: Path, adapter_config: dict) -> None:
    """Give the base as many embedding rows as the trained model had, before the adapter loads.

    When training added tokens and resized the embeddings, peft (0.21) saves the whole resized input and output
    embedding matrices in the adapter (save_embedding_layers="auto" compares the vocab size with the base's
    config) and refuses to load them into a base of the old size. Their values replace whatever the resize
    initialises, so the new rows come from training, not from the resize.
    """
    rows = base.get_input_embeddings().weight.shape[0]
    shapes = _adapter_shapes(output_dir)
    in_name = _module_name(base, base.get_input_embeddings())
    out_name = _module_name(base, base.get_output_embeddings())
    in_rows, out_rows = _saved_rows(shapes, in_name), _saved_rows(shapes, out_name)
    target = in_rows or out_rows or max(rows, len(tokenizer))
    if target == rows:
        return
    new_ids = set(range(rows, len(tokenizer)))
    tied = bool(getattr(base.config.get_text_config(), "tie_word_embeddings", False))
    input_known = (in_rows or 0) >= len(tokenizer) or new_ids <= _token_indices(adapter_config, in_name)
    output_known = input_known if tied else (out_rows or 0) >= len(tokenizer) or new_ids <= _token_indices(adapter_config, out_name)
    if not (input_known and output_known):
        raise UserError(
            f"{output_dir}: the tokenizer has {len(tokenizer)} tokens but the base has {rows} embedding rows, and the "
            "adapter does not hold the trained rows of the added tokens (they would be random after merging). "
            "Train with the embeddings saved: resize the embeddings before get_peft_model and save with "
            "save_embedding_layers=True (or modules_to_save=['embed_tokens', 'lm_head'])"
        )
    # mean_resizing samples the new rows at random; they are overwritten from the adapter right after.
    base.resize_token_embeddings(target, mean_resizing=False)


def _set_generation_config(model, tokenizer, output_dir: Path) -> None:
    from transformers import GenerationConfig

    if (output_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(output_dir)
        return
    # The same stops the adapter was trained and scored with: the base's own, EOS, and a chat template's.
    from hf_vram.builders.model import set_stop_tokens

    set_stop_tokens(model.generation_config, tokenizer)


def _replace_dir(staging: Path, dest: Path) -> None:
    """Move the finished merge into place; an earlier merge there is removed only once the new one is whole."""
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    staging.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
