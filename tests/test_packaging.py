"""Shipped recipes travel inside the wheel, so `hf-vram recipes` and names work when installed from one."""

from __future__ import annotations

import subprocess
import sys

from .conftest import ROOT


def test_wheel_carries_recipes_and_finds_them_by_name(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True)
    wheel = next(wheels.glob("hf_vram-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = (
        "import hf_vram.recipe.load as l; r = l.shipped_recipes(); "
        "print(l.find_recipe('demo')); print(sorted(r)); print(l.load_recipe('llama7b-qlora-alpaca').name)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found, names, loaded = proc.stdout.splitlines()
    assert found.startswith(str(target)) and found.endswith("hf_vram/recipes/demo.yaml")
    assert {"demo", "demo-base", "llama7b-qlora-alpaca"} <= set(eval(names))
    assert loaded == "llama7b-qlora-alpaca"
