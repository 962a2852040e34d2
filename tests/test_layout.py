"""The package's shape, checked from its source: no import circle inside hf_vram/ or data_prep/, one direction between
them, no function over 80 lines, no private name imported across modules, no two public names with two meanings,
and the dispatch tables (tasks, diffusion architectures) complete."""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import pytest

from hf_vram.builders.diffusion_archs import ARCHS

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hf_vram", "data_prep")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path):
    """(imported module, imported names) of every import in a module, those inside functions included."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, node.module] if node.module else base)
            yield target, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def _graph() -> dict[str, set[str]]:
    graph = collections.defaultdict(set)
    for name, path in MODULES.items():
        for target, names in _imports(name, path):
            for candidate in (target, *(f"{target}.{n}" for n in names)):
                if candidate in MODULES and candidate != name:
                    graph[name].add(candidate)
    return graph


def test_no_import_circle():
    graph, cycles = _graph(), []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in MODULES:
        if name not in state:
            visit(name, [name])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_data_prep_does_not_import_hf_vram():
    wrong = [(a, b) for a, targets in _graph().items() for b in targets
             if a.startswith("data_prep") and b.startswith("hf_vram")]
    assert not wrong


def _functions():
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield name, node


def test_no_function_over_80_lines():
    long = [f"{m}.{f.name}: {f.end_lineno - f.lineno + 1} lines" for m, f in _functions()
            if f.end_lineno - f.lineno + 1 > 80]
    assert not long, long


def test_no_private_name_imported_across_modules():
    private = [f"{name} imports {target}.{n}" for name, path in MODULES.items()
               for target, names in _imports(name, path) if target.split(".")[0] in PACKAGES
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert not private, private


def test_no_public_name_defined_twice():
    where = collections.defaultdict(list)
    for name, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                where[node.name].append(name)
    twice = {k: v for k, v in where.items() if len(v) > 1}
    assert not twice, twice


def test_tasks_table_matches_the_schema_and_every_runner_has_the_interface():
    import typing

    from hf_vram.recipe.schema import Recipe
    from hf_vram.runners.base import Runner
    from hf_vram.tasks import TASKS

    assert set(typing.get_args(Recipe.model_fields["task"].annotation)) == set(TASKS)
    for task in TASKS.values():
        runner = task.runner_class()
        assert issubclass(runner, Runner)
        for method in ("setup", "train", "save_output", "card"):
            assert getattr(runner, method) is not getattr(Runner, method), f"{runner.__name__}.{method}"
        planner = task.make_planner()
        if planner is not None:
            for method in ("plan", "fit", "format", "fix_hint", "longest", "measure", "table_row"):
                assert callable(getattr(planner, method)), f"{type(planner).__name__}.{method}"


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_diffusion_architecture_is_complete(arch):
    """Each row of the table has a diffusers class, a forward, and a builder for each pipeline it can be saved as."""
    import diffusers

    from hf_vram.builders import diffusion

    a = ARCHS[arch]
    assert hasattr(diffusers, a.model_class)
    assert arch in diffusion._FORWARDS
    for name in [*a.latent.values(), *a.pixel.values()]:
        assert name in diffusion._PIPELINES, name
    assert set(ARCHS) == set(diffusion._FORWARDS)
