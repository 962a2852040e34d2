"""`hf-vram export OUTPUT_DIR --gguf TYPE...`: the output as GGUF files and an Ollama Modelfile in OUTPUT_DIR/gguf.

An adapter is merged into its base first, exactly as `hf-vram merge` does (the base reloaded unquantized), into a
temporary folder that is removed afterwards; a full model is read as it is.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.atomic import atomic_write_text
from hf_vram.errors import UserError
from hf_vram.export.check import RoundTrip, reference, round_trip
from hf_vram.export.gguf_file import WRITTEN_TYPES, Written, write_gguf
from hf_vram.export.modelfile import modelfile_text
from hf_vram.export.quantize import check_kinds, llama_cpp_quantize


@dataclass
class Exported:
    folder: Path
    files: list[Written]
    modelfile: Path
    checks: list[RoundTrip] = field(default_factory=list)


def _write_kind(model_dir: Path, dest: Path, kind: str, scratch: Path, name: str) -> Written:
    if kind in WRITTEN_TYPES:
        return write_gguf(model_dir, dest, kind, name)
    # llama.cpp quantizes from 16 bits: bf16 when the model is saved in bf16 (f16 could overflow), else f16.
    dtype = json.loads((model_dir / "config.json").read_text()).get("dtype")
    sixteen = write_gguf(model_dir, scratch / f"{dest.stem}.16bit.gguf", "bf16" if dtype == "bfloat16" else "f16", name)
    llama_cpp_quantize(sixteen.path, dest, kind)
    sixteen.path.unlink()
    from gguf import GGUFReader

    types: dict[str, int] = {}
    for t in GGUFReader(dest).tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return Written(dest, types)


def write_folder(model_dir: Path, folder: Path, kinds: list[str], name: str, scratch: Path) -> tuple[list[Written], Path]:
    """GGUF files of every kind and a Modelfile (FROM the first) for the full model in model_dir, into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [_write_kind(model_dir, folder / f"{name}-{kind}.gguf", kind, scratch, name) for kind in kinds]
    config = json.loads((model_dir / "config.json").read_text())
    modelfile = folder / "Modelfile"
    atomic_write_text(modelfile, modelfile_text(files[0].path.name, model_dir, config["max_position_embeddings"]))
    return files, modelfile


def _full_model(output_dir: Path, scratch: Path) -> Path:
    if (output_dir / "adapter_config.json").is_file():
        from hf_vram.merge import merge_adapter

        # The recipe and generation settings travel with the merge; the Modelfile reads the prompt layout there.
        return merge_adapter(output_dir, scratch / "merged")
    if (output_dir / "config.json").is_file():
        return output_dir
    raise UserError(f"{output_dir} is not an output (no adapter_config.json or config.json): run hf-vram train first")


def check_prompt(model_dir: Path) -> tuple[str, int]:
    """The recipe's first sample prompt laid out as in training (the demo's question), and its answer length."""
    import yaml

    from hf_vram.generate import prompt_for

    recipe = model_dir / "recipe.yaml"
    settings = (yaml.safe_load(recipe.read_text()) or {}).get("eval", {}) if recipe.is_file() else {}
    prompt = prompt_for(model_dir, (settings.get("sample_prompts") or ["Hello"])[0])
    if isinstance(prompt, list):
        from transformers import AutoTokenizer

        prompt = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt, int(settings.get("max_new_tokens", 16))


def export_gguf(output_dir: Path, kinds: list[str], check: bool = False) -> Exported:
    """Export OUTPUT_DIR as GGUF files of `kinds` (and a Modelfile) into OUTPUT_DIR/gguf; `check` runs the round
    trip of every file against the full model (each loaded in float32 in turn: 4 bytes per parameter of memory)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise UserError(f"{output_dir}: no such directory")
    kinds = check_kinds(kinds)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=output_dir) as tmp:
        return _export(_full_model(output_dir, Path(tmp)), output_dir, kinds, check, Path(tmp))


def export_merged(merged_dir: Path, kinds: list[str], check: bool = False) -> Exported:
    """`merge --gguf`: the GGUF files of a merge just written, into MERGED/gguf, described in its card."""
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=merged_dir) as tmp:
        return _export(Path(merged_dir), Path(merged_dir), check_kinds(kinds), check, Path(tmp))


def _export(model_dir: Path, card_dir: Path, kinds: list[str], check: bool, scratch: Path) -> Exported:
    files, modelfile = write_folder(model_dir, card_dir / "gguf", kinds, card_dir.name, scratch)
    exported = Exported(card_dir / "gguf", files, modelfile)
    laid_out, n = check_prompt(model_dir)
    describe_in_card(card_dir, exported, model_dir, laid_out)
    if check:
        ref = reference(model_dir, laid_out, n)
        exported.checks = [round_trip(ref, f.path) for f in files]
    return exported


def describe_in_card(card_dir: Path, exported: Exported, model_dir: Path, laid_out: str) -> None:
    """The card's GGUF section (the card of the output, or of a merge), naming the Hub repository once pushed."""
    import yaml

    from hf_vram.output.cards.gguf import add_gguf_section, gguf_section

    recipe = model_dir / "recipe.yaml"
    saved = (yaml.safe_load(recipe.read_text()) or {}) if recipe.is_file() else {}
    model_ref = (saved.get("hub") or {}).get("repo_id") or str(card_dir)
    prompt = ((saved.get("eval") or {}).get("sample_prompts") or ["Hello"])[0]
    section = gguf_section(card_dir, exported.files, exported.modelfile, model_ref, prompt, laid_out)
    add_gguf_section(card_dir / "README.md", section)


__all__ = ["Exported", "check_prompt", "export_gguf", "export_merged", "write_folder"]
