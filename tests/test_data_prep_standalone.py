"""data_prep stands alone: hf_vram imports data_prep, never the other way round."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys

from .conftest import ROOT

DATA_PREP = ROOT / "data_prep"
MODULES = sorted(p.stem for p in DATA_PREP.glob("*.py") if p.stem != "__init__")


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import in the tree, those inside functions and branches too."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def test_no_data_prep_source_imports_hf_vram():
    offenders = []
    for path in sorted(DATA_PREP.glob("*.py")):
        for line, module in _imported(ast.parse(path.read_text(), str(path))):
            if module == "hf_vram" or module.startswith("hf_vram."):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not offenders, "data_prep must not import hf_vram:\n" + "\n".join(offenders)


def test_every_data_prep_module_imports_with_hf_vram_refused():
    # A finder first on sys.meta_path refuses hf_vram, so an import of it anywhere (at module level, or one a
    # module runs while being imported) fails the import of that data_prep module.
    code = f"""
import importlib, sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == "hf_vram" or name.startswith("hf_vram."):
            raise ImportError(f"data_prep imported {{name}}")
        return None

sys.meta_path.insert(0, Refuse())
for name in {["data_prep"] + [f"data_prep.{m}" for m in MODULES]!r}:
    importlib.import_module(name)
assert not any(m == "hf_vram" or m.startswith("hf_vram.") for m in sys.modules), sorted(sys.modules)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


def test_hf_vram_errors_are_data_prep_errors():
    import data_prep.errors as dp
    import hf_vram.errors as hv

    assert hv.UserError is dp.UserError and hv.DataError is dp.DataError and hv.did_you_mean is dp.did_you_mean
    assert issubclass(hv.RecipeError, dp.UserError) and dp.DataError.exit_code == 2


def test_image_defaults_agree_with_the_recipe_schema():
    """data_prep's defaults for a recipe without data.images are the schema's ImageSection defaults, field by field."""
    from data_prep.images import ImageOptions
    from hf_vram.recipe.schema import ImageSection

    ours = {f.name: f.default for f in dataclasses.fields(ImageOptions)}
    schema = ImageSection()
    assert set(ours) == set(ImageSection.model_fields)
    for name, default in ours.items():
        assert getattr(schema, name) == default, name
