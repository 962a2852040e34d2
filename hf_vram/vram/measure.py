"""Measure the memory of one training step (forward, backward, optimizer step) by category.

Why a hand-written tracker: torch's own ``torch.distributed._tools.mem_tracker.MemTracker`` registers hooks on
every parameter and refuses frozen ones ("cannot register a hook on a tensor that doesn't require gradient"), and
every adapter run (LoRA on a frozen, possibly 4-bit base) has them. Counting storages is simpler and model-agnostic:

* a ``TorchDispatchMode`` sees every op, forward and backward, and registers each storage its inputs and outputs use
  (dedupe by storage object: views share it); a ``weakref.finalize`` on the storage subtracts it when it dies.
  UntypedStorage keeps one Python object per storage for its whole life, so the finalizer fires on the real free.
* tensors made before the step (weights, 4-bit quant state, optimizer state, grads, batch) are registered up front.
* backward: on CPU the autograd engine runs in the calling thread; on CUDA its device thread inherits the dispatch
  mode stack (it is part of the thread-local state the engine propagates), so backward ops are seen either way.
* ``fake=True``: the same step runs under the model's ``FakeTensorMode``; fake tensors have storages with real
  ``nbytes`` and the same lifetime rules, so the numbers match real tensors without any weight memory.

Not seen: workspace a kernel allocates internally (cuBLAS, flash attention scratch), temporaries inside custom ops
(``torch.ops.bitsandbytes.*`` shows only its outputs), allocator rounding and fragmentation, the CUDA context.
"""

from __future__ import annotations

import weakref
from contextlib import ExitStack
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class Measured:
    weights: int  # live bytes before the step: parameters, buffers, 4-bit packed weights and their quant state
    grads: int  # bytes of .grad tensors alive after backward
    optimizer: int  # bytes the optimizer keeps after step() (Adam moments, step counters)
    # Peak during forward+backward minus what was live before it: weights, plus optimizer state and grads left by
    # earlier steps (none on a first step). Covers the batch, saved tensors, logits, temporaries, grads being built.
    activations: int
    peak: int  # peak live bytes over forward, backward and optimizer step

    def as_dict(self) -> dict:
        return asdict(self)


class PeakTracker(TorchDispatchMode):
    """Current and peak bytes of the live storages it knows about."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}  # id(storage) -> nbytes; the finalizer removes the id before it can be reused
        self.finalizers: list[weakref.finalize] = []
        self.current = 0
        self.peak = 0

    paused = False  # inside untracked(): allocations that are not device memory (offloaded host copies)

    def untracked(self):
        from contextlib import contextmanager

        @contextmanager
        def paused():
            self.paused = True
            try:
                yield
            finally:
                self.paused = False

        return paused()

    def track(self, t) -> None:
        if not isinstance(t, torch.Tensor) or self.paused:
            return
        try:
            storage = t.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse / nested layouts have no single storage
            return
        key, nbytes = id(storage), storage.nbytes()
        old = self.live.get(key)
        if old is None:
            self.finalizers.append(weakref.finalize(storage, self._free, key))
        self.live[key] = nbytes
        self.current += nbytes - (old or 0)  # an in-place resize_ changes a known storage's size
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def close(self) -> None:
        for f in self.finalizers:  # weights outlive the measurement; their finalizers must not keep the tracker
            f.detach()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Inputs too: a tensor made before the step and not registered (a cache on a module) still occupies memory.
        for t in tree_flatten((args, kwargs))[0]:
            self.track(t)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


def _quant_state_tensors(qs, seen: set[int]):
    # bitsandbytes QuantState: absmax, code, offset, and a nested state2 (absmax, code) under double quantization.
    if qs is None or id(qs) in seen:
        return
    seen.add(id(qs))
    for v in vars(qs).values():
        if isinstance(v, torch.Tensor):
            yield v
        elif hasattr(v, "absmax"):
            yield from _quant_state_tensors(v, seen)


def model_tensors(model: torch.nn.Module):
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            yield p
            yield from _quant_state_tensors(getattr(p, "quant_state", None), seen)
        yield from module.buffers(recurse=False)
        # Plain tensor attributes (caches, constants) take memory like buffers do.
        yield from (v for v in vars(module).values() if isinstance(v, torch.Tensor))


def _unique_bytes(tensors) -> int:
    sizes = {}
    for t in tensors:
        storage = t.untyped_storage()
        sizes[id(storage)] = storage.nbytes()
    return sum(sizes.values())


def _fake_mode_of(model: torch.nn.Module):
    """The FakeTensorMode the model's tensors belong to, or None for real tensors."""
    from torch._subclasses.fake_tensor import FakeTensor

    tensors = list(model_tensors(model))
    modes = {id(t.fake_mode): t.fake_mode for t in tensors if isinstance(t, FakeTensor)}
    if not modes:
        return None
    if len(modes) > 1 or not all(isinstance(t, FakeTensor) for t in tensors):
        # bitsandbytes' Params4bit cannot even be created under FakeTensorMode, so a 4-bit layer ends up real here.
        raise ValueError(
            "the model mixes fake and real tensors (or several FakeTensorModes); bitsandbytes layers cannot be "
            "measured with fake tensors: measure real tensors at a smaller size instead"
        )
    return next(iter(modes.values()))


def measure_step(model: torch.nn.Module, batch: dict, optimizer: torch.optim.Optimizer, fake: bool = False,
                 around_step=None) -> Measured:
    """Run ``loss = model(**batch).loss; loss.backward(); optimizer.step()`` and report its memory by category.

    Grads are left in place (not zeroed). With ``fake=True`` the model and batch must come from one
    ``FakeTensorMode``; a failure there (bitsandbytes layers, data-dependent ops) raises ValueError so the caller can
    measure real tensors at a smaller size instead. ``around_step(tracker)``, if given, makes a context the forward
    and backward run in (activation offloading, whose host copies it can keep out of the count with
    ``tracker.untracked()``).
    """
    fake_mode = _fake_mode_of(model)
    if fake and fake_mode is None:
        raise ValueError("fake=True needs a model built under FakeTensorMode (its parameters are real tensors)")
    params = [p for group in optimizer.param_groups for p in group["params"]] + list(model.parameters())
    tracker = PeakTracker()
    try:
        for t in model_tensors(model):
            tracker.track(t)
        weights = tracker.current
        opt_state = [t for t in tree_flatten(list(optimizer.state.values()))[0] if isinstance(t, torch.Tensor)]
        opt_before = _unique_bytes(opt_state)  # state from earlier steps is kept by the optimizer too
        for t in opt_state + [p.grad for p in params if p.grad is not None]:
            tracker.track(t)
        baseline = tracker.current
        for t in batch.values():
            tracker.track(t)
        with ExitStack() as stack:
            if fake_mode is not None:
                stack.enter_context(fake_mode)
            stack.enter_context(tracker)
            try:
                with around_step(tracker) if around_step else ExitStack():
                    loss = model(**batch).loss
                    loss.backward()
                fb_peak = tracker.peak
                grads = _unique_bytes(p.grad for p in params if p.grad is not None)
                del loss  # the graph is already freed; the scalar is not optimizer memory
                before_step = tracker.current
                optimizer.step()
            except Exception as e:
                if fake_mode is None:
                    raise
                raise ValueError(
                    f"measuring under fake tensors failed ({type(e).__name__}: {e}); "
                    "measure real tensors at a smaller size instead"
                ) from e
        return Measured(
            weights=weights,
            grads=grads,
            optimizer=opt_before + tracker.current - before_step,
            activations=fb_peak - baseline,
            peak=tracker.peak,
        )
    finally:
        tracker.close()
