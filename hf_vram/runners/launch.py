"""Several processes: re-run `hf-vram train` under torchrun or `accelerate launch`.

On CPU, torchrun is used because `accelerate launch --cpu` silently runs a single process; the Trainer
then forms one gloo DDP group (TrainingArguments(use_cpu=True) -> Accelerator(cpu=True)). On GPUs an
accelerate config file (recipes/accelerate/*.yaml: DDP, FSDP, DeepSpeed ZeRO-2/3) can be named instead.
"""

from __future__ import annotations

import subprocess
import sys

from hf_vram.recipe.load import LoadedRecipe
from hf_vram.runners.run import train_dependencies


def launch_command(recipe_ref: str, overrides: list[str], nproc: int, accelerate_config: str | None = None) -> list[str]:
    inner = ["-m", "hf_vram", "train", recipe_ref, *overrides]
    if accelerate_config:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
                "--num_processes", str(nproc), *inner]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *inner]


def launch(loaded: LoadedRecipe, recipe_ref: str, overrides: list[str], nproc: int, accelerate_config: str | None) -> int:
    """Train the recipe's dependencies here (one process), then the recipe itself in nproc processes."""
    train_dependencies(loaded)
    cmd = launch_command(recipe_ref, overrides, nproc, accelerate_config)
    print(f"[hf-vram] launching {nproc} processes: {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd)
