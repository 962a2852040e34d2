"""train.activation_offloading: tensors saved for backward (with gradient checkpointing, the layer inputs) moved to
CPU memory in forward and brought back for backward.

On a GPU this is trl's OffloadActivations (pinned host buffers, copies overlapped with compute on a side stream,
the LM head's input kept on the GPU). trl's class needs an accelerator (it creates device streams), so a CPU run,
where there is nowhere to offload to, gets `HostCopies` below: the same saved-tensor hooks doing real copies, which
lets the CPU tests check that offloading leaves loss and gradients unchanged, and lets the CPU memory measurement
(hf_vram/vram/measure.py) count the copies as host memory.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.autograd.graph import saved_tensors_hooks

# trl's default: tensors under 1 KiB are not worth a copy.
MIN_OFFLOAD_BYTES = 1024


class HostCopies(saved_tensors_hooks):
    """Saved tensors of MIN_OFFLOAD_BYTES or more (parameters excepted) kept as host copies until backward needs
    them. `host_bytes` counts what was moved; `untracked` (if given) makes the context each copy is made in, so a
    memory tracker can leave the copy out of device memory."""

    def __init__(self, model: torch.nn.Module, untracked=None):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}
        self.host_bytes = 0
        self.untracked = untracked  # a context manager factory: allocations inside it are not device memory

        def pack(t: torch.Tensor):
            nbytes = t.element_size() * t.nelement()
            if nbytes < MIN_OFFLOAD_BYTES or isinstance(t, torch.nn.Parameter) or t.untyped_storage().data_ptr() in self.params:
                return t
            self.host_bytes += nbytes
            with self.untracked() if self.untracked else nullcontext():
                copy = torch.empty(t.size(), dtype=t.dtype, device="cpu", pin_memory=t.device.type == "cuda")
                copy.copy_(t, non_blocking=t.device.type == "cuda")
            return (t.device, copy)

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, copy = packed
            return copy.to(device, non_blocking=True)

        super().__init__(pack, unpack)


def offload_context(model: torch.nn.Module):
    """The context the forward pass runs in when offloading is on (backward unpacks whatever it packed)."""
    if torch.cuda.is_available():
        from trl.models.activation_offloading import get_act_offloading_ctx_manager

        return get_act_offloading_ctx_manager(model, warn_if_no_head=False)
    return HostCopies(model)
