"""The fused LM-head loss on the CPU: per-token log-probabilities of `hidden @ weight.T` in chunks of tokens, never
the whole `[tokens x vocabulary]` logits, with a backward of its own.

Why not trl's own on the CPU: trl 1.16's ChunkedLogProbFunction runs Triton kernels on GPUs and, elsewhere, a torch
fallback of the same kernels that recomputes every tile in backward and makes about seven fp32 passes over each
[4,096 x 32,768] tile: 2.5x the time of plain cross-entropy on full logits (2,048 tokens, 16k vocabulary). Here
each chunk's gradient with respect to the hidden states is made in the forward, while its logits exist (as
liger-kernel's fused linear cross-entropy does on GPUs), so the step costs what the full-logits loss costs: one
matmul forward, one back, no recomputation. The upstream gradient of each token's log-probability is only known
in backward, so what is kept is d log p(target) / d hidden per token (tokens x hidden, as trl's fp32 gradient
accumulator), scaled there.

The head's weight and bias get no gradient this way (they are frozen under an adapter, the case this serves); when
they need one (a full fine-tune) backward recomputes each chunk's logits for the two gradient matmuls, and when the
entropy is differentiated (no trl trainer does) it recomputes with autograd.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

# Logit values per chunk: 16M fp32 values (64 MiB), and a few temporaries of that size.
CHUNK_VALUES = 1 << 24


def chunk_tokens(vocab: int) -> int:
    return max(1, CHUNK_VALUES // vocab)


def _logits(h, weight, bias, compute_dtype, logit_scale, softcap, inv_t):
    """(z, dz/dy) of one chunk: the transformed fp32 logits, and their derivative with respect to the raw logits
    (a scalar, or a tensor under softcapping)."""
    y = h.to(compute_dtype) @ weight.to(compute_dtype).t()
    if bias is not None:
        y = y + bias.to(compute_dtype)
    y = y.float()
    if logit_scale != 1.0:  # each scaling is a pass over the chunk and a temporary of its size: only when needed
        y = y * logit_scale
    if softcap is None:
        return (y * inv_t if inv_t != 1.0 else y), inv_t * logit_scale
    t = torch.tanh(y / softcap)
    return softcap * t * inv_t, inv_t * logit_scale * (1 - t * t)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) as a batched matmul, without an [n x vocabulary] product in memory."""
    return (a.unsqueeze(1) @ b.unsqueeze(-1)).squeeze(-1).squeeze(-1)


class CPUChunkedLogProbs(torch.autograd.Function):
    """Same arguments and outputs as trl.kernels.ChunkedLogProbFunction (trl 1.16)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                logit_scale=1.0, outputs=("log_probs",)):
        ctx.set_materialize_grads(False)
        cast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
        n, vocab = hidden.shape[0], weight.shape[0]
        inv_t, softcap = 1.0 / temperature, final_logit_softcapping
        logprobs = torch.empty(n, dtype=torch.float32)
        extra = {k: torch.empty(n, dtype=torch.bool if k == "is_top1" else torch.float32) for k in outputs if k != "log_probs"}
        # A trained head's backward recomputes the chunks (_head_grads): nothing to keep for it here.
        head_trained = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[2])
        d_hidden = torch.empty(n, hidden.shape[1], dtype=torch.float32) if ctx.needs_input_grad[0] and not head_trained else None
        step = chunk_tokens(vocab)
        for s in range(0, n, step):
            c = slice(s, min(s + step, n))
            z, dz = _logits(hidden[c], weight, bias, cast, logit_scale, softcap, inv_t)
            # One log-softmax pass gives everything: the target's log-probability, the argmax, the logsumexp (z -
            # log p, the same in every column), then the probabilities in place for the entropy and the gradient.
            logp = torch.log_softmax(z, -1)
            target = targets[c].unsqueeze(-1)
            logprobs[c] = logp.gather(-1, target).squeeze(-1)
            if "mean_logits" in extra:
                extra["mean_logits"][c] = logp.mean(-1) + (z[:, 0] - logp[:, 0])
            if "is_top1" in extra:
                extra["is_top1"][c] = logp.argmax(-1) == targets[c]  # the first maximum, as trl counts it
            del z
            p = logp.exp()
            if "entropy" in extra:
                extra["entropy"][c] = -_row_dot(p, logp)
            if "log_sum_sq_probs" in extra:
                extra["log_sum_sq_probs"][c] = torch.log(_row_dot(p, p))
            del logp
            if d_hidden is not None:
                # d log p(target) / dz = onehot(target) - p, then through the transform and the matmul.
                g = p.neg_().scatter_add_(-1, target, torch.ones_like(target, dtype=p.dtype))
                if not isinstance(dz, float) or dz != 1.0:
                    g = g * dz
                d_hidden[c] = g.to(cast) @ weight.to(cast)
                del g
            del p  # before the next chunk's logits: two chunk-sized tensors at a time, not three
        ctx.save_for_backward(hidden, weight, bias, targets, d_hidden)
        ctx.args = (cast, logit_scale, softcap, inv_t)
        ctx.mark_non_differentiable(*(extra[k] for k in ("log_sum_sq_probs", "mean_logits", "is_top1") if k in extra))
        return (logprobs, *(extra.get(k) for k in ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")))

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_):
        hidden, weight, bias, targets, d_hidden = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if grad_entropy is None and not needs_weight and not needs_bias:
            grad = None
            if needs_hidden and grad_logprobs is not None:
                grad = (d_hidden * grad_logprobs.float().unsqueeze(-1)).to(hidden.dtype)
            return grad, None, None, *([None] * 6)
        if grad_entropy is None:
            return (*_head_grads(ctx, hidden, weight, bias, targets, grad_logprobs), *([None] * 6))
        return (*_recomputed_grads(ctx, hidden, weight, bias, targets, grad_logprobs, grad_entropy), *([None] * 6))


def _head_grads(ctx, hidden, weight, bias, targets, grad_logprobs):
    """A trained head (full fine-tunes): each chunk's logits again, turned in place into the gradient of the
    log-probabilities, then the two gradient matmuls; the head's gradient accumulates in fp32."""
    cast, logit_scale, softcap, inv_t = ctx.args
    needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32) if needs_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32) if needs_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32) if needs_bias and bias is not None else None
    step = chunk_tokens(weight.shape[0])
    for s in range(0, hidden.shape[0], step):
        c = slice(s, min(s + step, hidden.shape[0]))
        z, dz = _logits(hidden[c], weight, bias, cast, logit_scale, softcap, inv_t)
        g = torch.softmax(z, -1).neg_()
        del z
        target = targets[c].unsqueeze(-1)
        g.scatter_add_(-1, target, torch.ones_like(target, dtype=g.dtype)).mul_(grad_logprobs[c].float().unsqueeze(-1))
        if not isinstance(dz, float) or dz != 1.0:
            g = g * dz
        if grad_hidden is not None:
            grad_hidden[c] = g.to(cast) @ weight.to(cast)
        if grad_weight is not None:
            grad_weight.addmm_(g.t(), hidden[c].float())  # accumulated in fp32, as trl does
        if grad_bias is not None:
            grad_bias += g.sum(0)
        del g
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip((grad_hidden, grad_weight, grad_bias),
                                                                        (hidden, weight, bias)))


def _recomputed_grads(ctx, hidden, weight, bias, targets, grad_logprobs, grad_entropy):
    """Gradients of hidden, weight and bias by autograd through each chunk again (a trained head, or a
    differentiated entropy)."""
    cast, logit_scale, softcap, inv_t = ctx.args
    needs = ctx.needs_input_grad[:3]
    grads = [torch.zeros_like(t, dtype=torch.float32) if need and t is not None else None
             for t, need in zip((hidden, weight, bias), needs)]
    step = chunk_tokens(weight.shape[0])
    for s in range(0, hidden.shape[0], step):
        c = slice(s, min(s + step, hidden.shape[0]))
        with torch.enable_grad():
            inputs = [hidden[c].detach().requires_grad_(needs[0]), weight.detach().requires_grad_(needs[1]),
                      None if bias is None else bias.detach().requires_grad_(needs[2])]
            z, _ = _logits(*inputs, cast, logit_scale, softcap, inv_t)
            lse = torch.logsumexp(z, -1)
            objective = z.new_zeros(())
            if grad_logprobs is not None:
                objective = objective + ((z.gather(-1, targets[c].unsqueeze(-1)).squeeze(-1) - lse) * grad_logprobs[c]).sum()
            if grad_entropy is not None:
                entropy = lse - (torch.softmax(z, -1) * z).sum(-1)
                objective = objective + (entropy * grad_entropy[c]).sum()
            wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
            got = iter(torch.autograd.grad(objective, wanted, allow_unused=True))
        for i, (t, need) in enumerate(zip(inputs, needs)):
            if need and t is not None:
                g = next(got)
                if g is not None:
                    if i == 0:
                        grads[0][c] += g
                    else:
                        grads[i] += g
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, (hidden, weight, bias)))


# Set while hf-vram's own trainers compute a loss (train/trainers.py): trl's trainers elsewhere in the process (a
# benchmark's plain side) keep trl's kernel.
_IN_HF_VRAM = contextvars.ContextVar("hf_vram_cpu_fused_head", default=False)


@contextlib.contextmanager
def cpu_fused_head():
    token = _IN_HF_VRAM.set(True)
    try:
        yield
    finally:
        _IN_HF_VRAM.reset(token)


class _OnTheCPU:
    """Stands where trl's fused forward looks up its kernel (trl 1.16: trl.trainer.utils._ChunkedLogProbFunction, read
    at each call): CPU tensors inside cpu_fused_head() go to CPUChunkedLogProbs, everything else to trl's own."""

    trl_function = None

    @classmethod
    def apply(cls, hidden, *args):
        if hidden.device.type == "cpu" and _IN_HF_VRAM.get():
            return CPUChunkedLogProbs.apply(hidden, *args)
        return cls.trl_function.apply(hidden, *args)


def use_cpu_fused_loss() -> None:
    """Route trl's fused LM head to CPUChunkedLogProbs for CPU tensors under cpu_fused_head() (trl 1.16:
    tests/test_long_context.py fails if trl stops looking the kernel up there). Idempotent; GPU tensors keep trl's
    Triton kernels."""
    import trl.trainer.utils as trl_utils

    if trl_utils._ChunkedLogProbFunction is _OnTheCPU:
        return
    _OnTheCPU.trl_function = trl_utils._ChunkedLogProbFunction
    trl_utils._ChunkedLogProbFunction = _OnTheCPU
