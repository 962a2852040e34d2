"""Every shipped file under recipes/ validates: training recipes by the schema, launch configs by accelerate."""

from __future__ import annotations

import pytest

from hf_vram.cli import main
from hf_vram.recipe.load import shipped_recipes

from .conftest import ROOT

ALL_FILES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_recipes_folder_is_not_empty():
    names = {p.stem for p in ALL_FILES}
    assert {"demo", "demo-base", "llama7b-qlora-alpaca"} <= names
    assert {"ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3"} <= names


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_recipe_file_validates(path, capsys):
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok:")


def test_shipped_recipes_are_found_by_name():
    recipes = shipped_recipes()
    assert recipes["demo"].name == "demo.yaml"
    assert "ddp" not in recipes  # launch configs are not training recipes


def test_recipes_command_lists_each_with_its_description(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out.splitlines()
    line = next(s for s in out if s.startswith("llama7b-qlora-alpaca"))
    assert "QLoRA of Llama-2-7B" in line
    assert len(out) == len(shipped_recipes())


def test_llama7b_recipe_uses_real_hub_ids_and_fits_12gb_settings():
    from hf_vram.recipe.load import load_recipe

    r = load_recipe("llama7b-qlora-alpaca").recipe
    assert r.model.name_or_path == "NousResearch/Llama-2-7b-hf"
    assert r.data.source == "tatsu-lab/alpaca"
    assert (r.quant.bits, r.quant.type, r.quant.double_quant) == (4, "nf4", True)
    assert r.train.gradient_checkpointing and r.train.optimizer == "paged_adamw_8bit"
    assert r.data.max_length == 512
