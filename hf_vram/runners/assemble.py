"""The runner of task assemble: a recipe's moe section -> hf_vram.moe.assemble -> an output directory like any
other (model, tokenizer, recipe.yaml, model card, train_summary.json), so that a fine-tune recipe can name it as
`model.name_or_path: recipe:NAME` and the chain builds it first. Nothing trains: the experts are copied into one
model on the CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

from data_prep.atomic import atomic_write_text
from hf_vram.output.publish import log
from hf_vram.output.summary import is_finished
from hf_vram.recipe.references import resolve_reference
from hf_vram.runners.base import Runner


class AssembleRunner(Runner):
    spec = None

    def setup(self) -> None:
        from hf_vram.moe.assemble import AssembleSpec, ExpertSpec

        r = self.recipe
        experts = [ExpertSpec(path, list(e.positive_prompts), list(e.negative_prompts))
                   for path, e in zip(self.refs.experts, r.moe.experts)]
        self.spec = AssembleSpec(base_model=self.refs.model, experts=experts, gate_mode=r.moe.gate_mode,
                                 dtype=r.moe.dtype, experts_per_token=r.moe.experts_per_token, seed=r.train.seed)
        if self.out.is_dir() and not is_finished(self.out):
            # A folder without a summary is an assembly that did not finish (assemble writes beside it and renames).
            shutil.rmtree(self.out)

    def train(self) -> None:
        from hf_vram.moe.assemble import assemble

        # Only the tokenizer the recipe names (else the base's own, which assemble copies).
        assemble(self.spec, self.out, tokenizer_source=resolve_reference(self.loaded, self.recipe.tokenizer.name_or_path))

    def save_output(self) -> None:
        spec = self.spec
        atomic_write_text(self.out / "recipe.yaml", self.loaded.resolved_yaml())
        self.summary.update(experts=[e.source_model for e in spec.experts], base_model=spec.base_model,
                            gate_mode=spec.gate_mode, experts_per_token=spec.experts_per_token,
                            total_params=safetensors_parameters(self.out))

    def card(self) -> str:
        from hf_vram.output.cards.assembled import assembled_card

        return assembled_card(self.loaded, self.summary)

    def report(self) -> None:
        log(f"assembled {len(self.spec.experts)} experts into {self.out} ({self.summary['total_params']:,} parameters)")


def safetensors_parameters(out: Path) -> int:
    """Parameters of the safetensors files in a folder, read from their headers."""
    from safetensors import safe_open

    total = 0
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total
