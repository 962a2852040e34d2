"""train.activation_offloading, train.tiled_mlp and train.kernels resolved to on or off: the one place `auto` is
decided, so that the runner and the planner (`hf-vram plan`) agree on what a recipe trains with."""

from __future__ import annotations

import importlib.util

from hf_vram.errors import UserError
from hf_vram.recipe.schema import Recipe

# From this sequence length, with gradient checkpointing, the checkpointed layer inputs (layers x tokens x hidden)
# outweigh what moving them over PCIe costs (about 5% of a QLoRA step at 8k on a 4070); below it they are small.
OFFLOAD_FROM = 8192
# From this length one MLP's activations (4 x intermediate per token: 3.5 GiB for an 8B at 32k) dominate a
# recomputed layer; the tiling costs one more MLP forward per layer, not worth it on shorter sequences.
TILED_MLP_FROM = 16384


def offloading_on(recipe: Recipe, cuda: bool) -> bool:
    """Whether checkpointed activations go to CPU memory. Only a GPU has anywhere to move them to."""
    t = recipe.train
    if t.activation_offloading == "auto":
        return cuda and t.gradient_checkpointing and recipe.data.max_length >= OFFLOAD_FROM
    return bool(t.activation_offloading)


def tiled_mlp_on(recipe: Recipe) -> bool:
    t = recipe.train
    if t.tiled_mlp == "auto":
        return recipe.data.max_length >= TILED_MLP_FROM
    return bool(t.tiled_mlp)


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def liger_on(recipe: Recipe, cuda: bool) -> bool:
    """Whether liger-kernel's RMSNorm, RoPE and SwiGLU replace the model's own. auto never breaks a CPU run;
    an explicit liger where it cannot run is an error, not a silent fallback."""
    k = recipe.train.kernels
    if k == "none":
        return False
    if k == "auto":
        return cuda and liger_available()
    if not cuda:
        raise UserError("train.kernels: liger runs Triton kernels on a GPU only; use train.kernels=auto (the model's "
                        "own kernels on the CPU)")
    if not liger_available():
        raise UserError("train.kernels: liger needs liger-kernel: pip install liger-kernel (or train.kernels=auto)")
    return True
