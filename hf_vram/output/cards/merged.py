"""The model card of a merged model: the adapter output's own card, edited to say the weights were merged."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hf_vram.output.cards.common import hub_id

if TYPE_CHECKING:
    import torch


def merged_card(output_dir: Path, base_ref: str, adapter_config: dict, dtype: torch.dtype):
    """The adapter output's card, marked as merged (library transformers, no adapter tag), or a new one."""
    from huggingface_hub import ModelCard, ModelCardData

    dtype_name = str(dtype).removeprefix("torch.")
    kind = str(adapter_config.get("peft_type", "LORA")).upper()
    if kind == "LORA":
        kind = "DoRA" if adapter_config.get("use_dora") else "rsLoRA" if adapter_config.get("use_rslora") else "LoRA"
    sentence = (
        f"The {kind} adapter of `{output_dir.name}` was merged into its base `{base_ref}`, reloaded unquantized "
        f"in {dtype_name}, with `hf-vram merge`: this folder is a plain transformers model, no peft needed."
    )
    readme = output_dir / "README.md"
    if readme.is_file():
        card = ModelCard.load(readme, ignore_metadata_errors=True)
    else:
        data = ModelCardData(pipeline_tag="text-generation", base_model=hub_id(base_ref), tags=["hf-vram", "text-generation"])
        card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {output_dir.name} (merged)\n")
    card.data.library_name = "transformers"
    # peft's own card tags it base_model:adapter:BASE; merged weights are no adapter of it any more.
    tags = [t for t in card.data.tags or [] if not str(t).startswith("base_model:adapter:")]
    card.data.tags = tags + ["merged"] if "merged" not in tags else tags
    lines = card.text.split("\n")
    title = next((i for i, line in enumerate(lines) if line.startswith("# ")), None)
    if title is None:
        card.text = f"{sentence}\n\n{card.text}"
    else:
        lines[title + 1 : title + 1] = ["", sentence]
        card.text = "\n".join(lines)
    return card
