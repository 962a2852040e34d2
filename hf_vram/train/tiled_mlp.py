"""train.tiled_mlp: each MLP runs over tiles of the sequence, and its backward recomputes one tile at a time, so an
MLP's activations (gate, up, act(gate), their product: 4 x intermediate per token, the largest tensors of a
Llama block) exist for one tile instead of the whole sequence. The idea of ALST (Arctic Long Sequence Training)
and axolotl's TiledMLP.

Written here because the packaged versions cannot serve: DeepSpeed's TiledMLP comes with DeepSpeed (not a
dependency of a single-GPU run), and liger-kernel's tiled MLP imports Triton, which a CPU run does not have.
"""

from __future__ import annotations

import math
import types

import torch


class _TiledMLP(torch.autograd.Function):
    """out = fn(x) tile by tile along the sequence (dim 1). Forward keeps no graph, only x; backward recomputes each
    tile with autograd on, takes the gradients of its input and of the MLP's trainable parameters, and returns
    their sums: each parameter gets its gradient once per step, as DDP's and FSDP's gradient hooks expect. The RNG
    replays forward's dropout masks."""

    @staticmethod
    def forward(ctx, fn, tiles: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        ctx.fn, ctx.tiles = fn, tiles
        ctx.autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.rng = torch.get_rng_state(), (torch.cuda.get_rng_state(x.device) if device == "cuda" else None)
        ctx.save_for_backward(x, *params)
        with torch.no_grad():
            parts = [fn(chunk) for chunk in x.chunk(tiles, dim=1)]
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, *params = ctx.saved_tensors
        device = x.device.type
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[2] else None
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[3:]) if need]
        sums = [None] * len(wanted)
        enabled, dtype = ctx.autocast
        devices = [x.device] if device == "cuda" else []
        # Identity hooks: activation offloading's hooks (active through the whole training step) must not pack the
        # tiles recomputed here, which would keep every tile alive and send it over PCIe.
        no_offload = torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)
        with torch.random.fork_rng(devices=devices, device_type=device), no_offload:
            cpu_state, cuda_state = ctx.rng
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, x.device)
            start = 0
            for chunk, grad in zip(x.chunk(ctx.tiles, dim=1), grad_out.chunk(ctx.tiles, dim=1)):
                chunk = chunk.detach().requires_grad_(grad_x is not None)
                with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                    out = ctx.fn(chunk)
                inputs = ([chunk] if grad_x is not None else []) + wanted
                got = list(torch.autograd.grad(out, inputs, grad, allow_unused=True))
                if grad_x is not None:
                    grad_x[:, start:start + chunk.shape[1]] = got.pop(0)
                sums = [g if s is None else (s if g is None else s + g) for s, g in zip(sums, got)]
                start += chunk.shape[1]
        by_param = iter(sums)
        param_grads = [next(by_param) if need else None for need in ctx.needs_input_grad[3:]]
        return (None, None, grad_x, *param_grads)


def _tiled_forward(self, x: torch.Tensor) -> torch.Tensor:
    tiles = math.ceil(x.shape[1] / self._tile_tokens) if x.dim() == 3 else 1  # [batch, sequence, hidden] only
    if tiles <= 1 or not torch.is_grad_enabled():  # short sequences and generation: the MLP as it is
        return self._untiled_forward(x)
    params = [p for p in self.parameters() if p.requires_grad]
    return _TiledMLP.apply(self._untiled_forward, tiles, x, *params)


def is_gated_mlp(module: torch.nn.Module) -> bool:
    """Llama-style MLPs (LlamaMLP, MistralMLP, Qwen2MLP, ...): down(act(gate(x)) * up(x)), token by token."""
    return all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn"))


def tile_mlps(model: torch.nn.Module, tile_tokens: int | None = None) -> int:
    """Make every gated MLP of the model tiled (tiles of tile_tokens; default hidden_size tokens, ALST's choice:
    a tile's activations are then about as large as one hidden state). Returns how many were changed."""
    tile_tokens = tile_tokens or model.config.hidden_size
    count = 0
    for module in model.modules():
        if is_gated_mlp(module) and not hasattr(module, "_untiled_forward"):
            module._untiled_forward = module.forward
            module._tile_tokens = tile_tokens
            module.forward = types.MethodType(_tiled_forward, module)
            count += 1
    return count
