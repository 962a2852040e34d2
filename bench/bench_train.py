"""Pretraining throughput of a small GPT-2 from scratch: hf-vram's `task: pretrain` path (the shipped nanoGPT recipe,
made small by overrides -> memory-mapped token shards -> transformers' Trainer) against a minimal hand-written
PyTorch loop in nanoGPT's style on the same model, blocks, batch, optimizer, clipping and precision, in this run.

    make bench            # or: python bench/bench_train.py --steps 100 [--compile]

Prints tokens/s of each, their ratio (hf-vram / plain loop; 1.0 = no overhead) and the model FLOPs utilisation of
each: nanoGPT's estimate_mfu FLOPs per token (6N + 12·L·H·Q·T) times tokens/s, over a matmul rate measured in
this run at the model's own size. Only steady-state steps are timed (the first --warmup steps are left out).

The text is ../shared/data/tinyshakespeare.txt when it is there, else Shakespeare-like text the bench generates.
bench/gpu_gpt2_mfu.py imports the helpers below for GPT-2 124M on a CUDA card.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import TrainerCallback  # noqa: E402

RECIPE = ROOT / "recipes" / "nanogpt-shakespeare-char.yaml"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
# nanoGPT's baby GPT made small enough for a 2-core CPU: 4 layers x 128 wide, block 128, no dropout.
SMALL_GPT2 = {"n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 128,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}


# ------------------------------------------------------------------------------------------------ data and recipe


def generated_text(path: Path, chars: int = 300_000, seed: int = 0) -> Path:
    """Shakespeare-like lines (a speaker, then verse of common words), about `chars` characters."""
    rng = random.Random(seed)
    speakers = ["ROMEO", "JULIET", "KING RICHARD II", "GLOUCESTER", "First Citizen", "MENENIUS", "LADY ANNE"]
    words = ("thou thy thee art hath doth my lord good sweet love death night day king queen crown blood heaven "
             "fair foul what shall will not be so and the of to in with that this but o gentle noble speak "
             "hence come go stay sir madam upon ere whence wherefore tongue heart grace honour").split()
    parts, n = [], 0
    while n < chars:
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))).capitalize() + rng.choice(",.;!?:")
                 for _ in range(rng.randint(1, 6))]
        part = f"{rng.choice(speakers)}:\n" + "\n".join(lines) + "\n\n"
        parts.append(part)
        n += len(part)
    path.write_text("".join(parts))
    return path


def corpus(folder: Path) -> tuple[Path, str]:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE, f"tiny shakespeare ({SHAKESPEARE})"
    path = generated_text(folder / "input.txt")
    return path, f"generated Shakespeare-like text ({path.stat().st_size:,} characters; {SHAKESPEARE} not found)"


def overrides_for(config: dict, source: Path, output_dir: Path, batch: int, steps: int, compile_: bool,
                  extra: tuple[str, ...] = ()) -> list[str]:
    """Command-line style overrides: the model and batch, a short run, nothing but training in the run (no
    held-out split, no samples, no checkpoint and no TensorBoard writer inside the timed steps)."""
    out = [f"model.config.{k}={v}" for k, v in config.items()]
    out += [
        f"data.source={source}", f"data.max_length={config['n_positions']}", "data.val_size=0",
        f"train.output_dir={output_dir}", f"train.micro_batch_size={batch}", "train.grad_accum=1",
        f"train.max_steps={steps}", f"train.save_steps={steps + 1000}", "train.report_to=[]",
        f"train.torch_compile={str(compile_).lower()}",
        "eval.sample_during_training=false", "eval.sample_prompts=[]",
    ]
    return out + list(extra)


# ------------------------------------------------------------------------------------------------ FLOPs and peak


def flops_per_token(model, block_size: int) -> tuple[int, float]:
    """nanoGPT's estimate_mfu: (N, 6N + 12·L·H·Q·T), N = parameters less the position embeddings (the token
    embedding is tied to the output layer, so its matmul counts)."""
    c = model.config
    n = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
    layers, heads, head_dim = c.n_layer, c.n_head, c.n_embd // c.n_head
    return n, 6 * n + 12 * layers * heads * head_dim * block_size


def pick_threads(m: int, k: int, n: int) -> tuple[int, str]:
    """The CPU thread count with the best fp32 matmul rate at the model's size, from 1 to torch's default. On a
    machine whose cores other jobs also use, fewer threads than cores can be many times faster (threads that
    wait on each other at every kernel); both sides then run with it."""
    rates = {}
    for t in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(t)
        rates[t] = matmul_rate(m, k, n, torch.float32, torch.device("cpu"), repeats=3, min_seconds=0.02)
    best = max(rates, key=rates.get)
    torch.set_num_threads(best)
    return best, ", ".join(f"{t} thread(s) {r / 1e9:.0f} GFLOP/s" for t, r in rates.items())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, repeats: int = 7,
                min_seconds: float = 0.05) -> float:
    """FLOP/s of (m x k) @ (k x n), best of `repeats` timings of a loop lasting at least min_seconds."""
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    out = torch.empty(m, n, dtype=dtype, device=device)
    for _ in range(3):
        torch.mm(a, b, out=out)
    sync(device)
    reps, elapsed = 1, 0.0
    while elapsed < min_seconds:  # calibrate the loop length
        reps *= 2
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        sync(device)
        elapsed = time.perf_counter() - t
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b, out=out)
        sync(device)
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * m * k * n / best


# ------------------------------------------------------------------------------------------------ timing


class WindowTimer(TrainerCallback):
    """Stamps the end of every optimizer step of the Trainer (its own loop, logging and callbacks included). On a
    GPU the device is synchronized at the two ends of the timed window only, not at every step."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.stamps: list[float] = []

    def on_step_end(self, args, state, control, **kw):
        if state.global_step in (self.warmup, state.max_steps):
            sync(self.device)
        self.stamps.append(time.perf_counter())


@dataclass
class Timing:
    stamps: list[float]  # end of each optimizer step 1..N
    warmup: int
    tokens_per_step: int

    @property
    def window_steps(self) -> int:
        return len(self.stamps) - self.warmup

    @property
    def window_seconds(self) -> float:
        return self.stamps[-1] - self.stamps[self.warmup - 1]

    @property
    def tokens_per_second(self) -> float:
        return self.window_steps * self.tokens_per_step / self.window_seconds

    @property
    def median_step(self) -> float:
        w = self.stamps[self.warmup - 1:]
        return statistics.median(b - a for a, b in zip(w, w[1:]))


# ------------------------------------------------------------------------------------------------ the plain loop


def cosine_with_min_lr(warmup: int, total: int, min_ratio: float):
    """The learning-rate factor of step s: linear warmup, then cosine decay to min_ratio (nanoGPT's get_lr)."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def lr_factor(args):
    """The plain loop's schedule for the Trainer's lr_scheduler_type (the ones the bench recipes use)."""
    name = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    total = args.max_steps
    warmup = args.get_warmup_steps(total)  # a fraction of the run when below 1
    if name == "cosine_with_min_lr":
        return cosine_with_min_lr(warmup, total, args.lr_scheduler_kwargs["min_lr"] / args.learning_rate)
    if name == "cosine":
        return cosine_with_min_lr(warmup, total, 0.0)
    if name == "constant":
        return lambda step: 1.0
    raise ValueError(f"bench: no plain-loop schedule for {name}")


def plain_optimizer(model, args) -> torch.optim.AdamW:
    """nanoGPT's configure_optimizers: decay on every tensor of 2 or more dimensions (matmul weights and
    embeddings), none on biases and LayerNorm; betas, eps, fused as the Trainer's arguments say."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = "fused" in str(getattr(args.optim, "value", args.optim))
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                             eps=args.adam_epsilon, fused=fused)


def describe_optimizer(opt) -> str:
    d = opt.defaults
    decays = sorted({g["weight_decay"] for g in opt.param_groups})
    return (f"torch.optim.{type(opt).__name__}(fused={d.get('fused')}, foreach={d.get('foreach')}, betas={d['betas']}, "
            f"eps={d['eps']}, weight_decay={'/'.join(str(w) for w in decays)} by group)")


class BlockReader:
    """nanoGPT's get_batch on hf-vram's memory-mapped shard: the blocks starting at the given offsets."""

    def __init__(self, tokens: np.ndarray, block: int, device: torch.device):
        self.tokens, self.block, self.device = tokens, block, device

    def __call__(self, starts) -> torch.Tensor:
        x = torch.from_numpy(np.stack([self.tokens[s:s + self.block] for s in starts]).astype(np.int64))
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x


class PlainLoop:
    """The baseline, one optimizer step per call: read the blocks, forward (autocast when mixed precision),
    backward, clip, AdamW, schedule, and the mean loss every log_every steps (as the Trainer logs it)."""

    def __init__(self, model, opt, schedule, get_batch, batches_of_starts, *, max_grad_norm: float, amp_dtype,
                 log_every: int, device: torch.device):
        self.model, self.opt, self.get_batch, self.batches = model, opt, get_batch, batches_of_starts
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        self.max_grad_norm, self.amp_dtype, self.log_every, self.device = max_grad_norm, amp_dtype, log_every, device
        self.step_no = 0
        self.losses: dict[int, float] = {}
        self._loss_sum = torch.zeros((), device=device)
        self._since_log = 0

    def step(self) -> None:
        x = self.get_batch(self.batches[self.step_no])
        self.step_no += 1
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            loss = self.model(input_ids=x, labels=x).loss
        loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self._loss_sum += loss.detach()
        self._since_log += 1
        if self.step_no == 1 or self.step_no % self.log_every == 0:
            self.losses[self.step_no] = self._loss_sum.item() / self._since_log
            self._loss_sum.zero_()
            self._since_log = 0

    def run(self, warmup: int) -> list[float]:
        """All its steps back to back: the end stamp of each (the device synchronized at the window's two ends)."""
        stamps = []
        while self.step_no < len(self.batches):
            self.step()
            if self.step_no in (warmup, len(self.batches)):
                sync(self.device)
            stamps.append(time.perf_counter())
        return stamps


class Interleave(TrainerCallback):
    """Alternates the two sides step by step, so that both meet the same load on a shared machine: after each of
    the Trainer's optimizer steps (its callbacks before this one included) one plain step runs here. A Trainer
    step is timed from the end of the plain step before it to its own on_step_end; everything the Trainer does in
    between (logging, data loading, its other callbacks) is in it. Per-step times, so the device is synchronized
    at every step: for a CPU."""

    def __init__(self, plain: PlainLoop):
        self.plain = plain
        self.hf_steps: list[float] = []
        self.plain_steps: list[float] = []
        self._mark: float | None = None

    def on_train_begin(self, args, state, control, **kw):
        self._mark = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        sync(self.plain.device)
        t = time.perf_counter()
        self.hf_steps.append(t - self._mark)
        self.plain.step()
        sync(self.plain.device)
        self._mark = time.perf_counter()
        self.plain_steps.append(self._mark - t)


def cumulative(durations: list[float]) -> list[float]:
    out, t = [], 0.0
    for d in durations:
        t += d
        out.append(t)
    return out


def step_starts(trainer, steps: int) -> list[list[int]]:
    """The block offsets of hf-vram's first `steps` batches: its dataloader's sampler (seeded, so the Trainer draws
    the same order when it trains) times the dataset's stride."""
    loader = trainer.get_train_dataloader()
    stride = trainer.train_dataset.stride
    out = []
    for indices in loader.batch_sampler:
        out.append([i * stride for i in indices])
        if len(out) == steps:
            return out
    raise SystemExit(f"bench: one pass over the data gives {len(out)} batches, fewer than the {steps} steps; "
                     "give more text or fewer --steps")


# ------------------------------------------------------------------------------------------------ both sides


@dataclass
class Result:
    hf: Timing
    plain: Timing
    hf_losses: dict[int, float]
    plain_losses: dict[int, float]
    hf_settings: str
    plain_settings: str
    n_params: int
    flops_per_token: float
    precision: str
    compiled: bool
    order: str
    block: int
    hf_loss_scale: float  # T / (T - 1) where the Trainer counts every label of a row, else 1


def compare(loaded, *, warmup: int, compile_: bool, order: str = "interleaved") -> Result:
    """Train the recipe through hf-vram (hf_vram.runners.run.setup and finish) and the same model through the plain
    loop: step by step alternately (order "interleaved"), or one whole run after the other ("hf-first",
    "plain-first"; the device synchronized at the two ends of the timed window only)."""
    from transformers import AutoModelForCausalLM

    from hf_vram.runners.run import finish, setup

    run = setup(loaded)
    trainer, args = run.trainer, run.trainer.args
    device = args.device
    steps = args.max_steps
    if warmup >= steps:
        raise SystemExit(f"--steps ({steps}) must be larger than --warmup ({warmup})")
    block = trainer.train_dataset.block_size
    batch = args.per_device_train_batch_size
    starts = step_starts(trainer, steps)
    reader = BlockReader(trainer.train_dataset.info.tokens("train"), block, device)
    first_batch = next(iter(trainer.get_train_dataloader()))["input_ids"]
    assert torch.equal(reader(starts[0]).cpu(), first_batch.cpu()), "the plain loop must read hf-vram's blocks"

    # The same weights: the config and the init seed hf-vram builds from (hf_vram/builders/model.py).
    torch.manual_seed(loaded.recipe.train.seed)
    plain_model = AutoModelForCausalLM.from_config(run.model.config,
                                                   attn_implementation=run.model.config._attn_implementation)
    for (name, p), q in zip(run.model.named_parameters(), plain_model.parameters()):
        assert torch.equal(p.detach().cpu(), q.detach()), f"initial weights differ at {name}"
    plain_model.to(device)
    opt = plain_optimizer(plain_model, args)
    amp = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
    plain = PlainLoop(torch.compile(plain_model) if compile_ else plain_model, opt, lr_factor(args), reader, starts,
                      max_grad_norm=args.max_grad_norm, amp_dtype=amp, log_every=args.logging_steps, device=device)
    tokens_per_step = batch * block * args.gradient_accumulation_steps

    if order == "plain-first":
        plain_stamps = plain.run(warmup)
    if order == "interleaved":
        both = Interleave(plain)
        trainer.add_callback(both)
    else:
        timer = WindowTimer(warmup, device)
        trainer.add_callback(timer)
    finish(run)  # the whole hf-vram path: its callbacks (memory log, checkpoints), logging, the save at the end
    if order == "interleaved":
        hf_stamps, plain_stamps = cumulative(both.hf_steps), cumulative(both.plain_steps)
    else:
        hf_stamps = timer.stamps
    if order == "hf-first":
        plain_stamps = plain.run(warmup)
    hf_losses = {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}
    hf_opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    precision = "bf16 autocast" if args.bf16 else "fp16 autocast" if args.fp16 else "fp32"
    hf_settings = (f"optim={getattr(args.optim, 'value', args.optim)} -> {describe_optimizer(hf_opt)}, "
                   f"torch_compile={args.torch_compile}, {precision}, clip {args.max_grad_norm}, "
                   f"lr {args.learning_rate:g} {getattr(args.lr_scheduler_type, 'value', args.lr_scheduler_type)}, "
                   f"warmup {args.get_warmup_steps(steps)} steps, logging every {args.logging_steps} steps")
    plain_settings = (f"{describe_optimizer(opt)}, torch.compile={compile_}, {precision}, "
                      f"clip {args.max_grad_norm}, the same schedule (LambdaLR), mean loss every {args.logging_steps} steps")
    n, fpt = flops_per_token(plain_model, block)
    loss_scale = 1.0 if getattr(trainer, "_loss_shifts_labels", True) else block / (block - 1)
    return Result(Timing(hf_stamps, warmup, tokens_per_step), Timing(plain_stamps, warmup, tokens_per_step),
                  hf_losses, plain.losses, hf_settings, plain_settings, n, fpt, precision, compile_, order, block,
                  loss_scale)


def report(res: Result, peak: float, peak_label: str, header: str) -> list[str]:
    """The results as lines: tokens/s, ratio, MFU of each side, settings, and the logged losses side by side."""
    hf, pl = res.hf, res.plain
    ratio = hf.tokens_per_second / pl.tokens_per_second
    mfu_hf = res.flops_per_token * hf.tokens_per_second / peak
    mfu_pl = res.flops_per_token * pl.tokens_per_second / peak
    common = sorted(set(res.hf_losses) & set(res.plain_losses))
    last = common[-1] if common else None
    lines = [
        header,
        f"timed steps {hf.warmup + 1}..{hf.warmup + hf.window_steps} ({hf.window_steps} steps, {res.order}, "
        f"{hf.tokens_per_step} tokens each); model FLOPs/token 6N + 12LHQT = {res.flops_per_token / 1e6:.2f} M "
        f"(N = {res.n_params / 1e6:.2f}M)",
        f"hf-vram (pretrain, Trainer) : {hf.tokens_per_second:12.0f} tokens/s  (window {hf.window_seconds:.2f} s, "
        f"median {hf.median_step * 1000:.1f} ms/step)",
        f"plain PyTorch loop          : {pl.tokens_per_second:12.0f} tokens/s  (window {pl.window_seconds:.2f} s, "
        f"median {pl.median_step * 1000:.1f} ms/step)",
        f"ratio hf-vram / plain       : {ratio:12.3f}  (median-step ratio {pl.median_step / hf.median_step:.3f})",
        f"matmul peak ({peak_label}) : {peak / 1e9:.1f} GFLOP/s",
        f"MFU hf-vram                 : {mfu_hf:12.3f}",
        f"MFU plain                   : {mfu_pl:12.3f}",
        f"hf-vram settings : {res.hf_settings}",
        f"plain settings   : {res.plain_settings}",
    ]
    if last is not None:
        hf_at = {k: v * res.hf_loss_scale for k, v in res.hf_losses.items()}
        note = ""
        if res.hf_loss_scale != 1:
            # transformers' Trainer divides the summed token loss by the batch's label count, and knows that a
            # causal LM shifts its labels only from the model's loss_type, which GPT2LMHeadModel does not set: it
            # counts T labels a row where T - 1 are predicted, so its losses (and gradients) are (T - 1) / T of
            # the mean. Its logged values are scaled back here.
            note = f" (hf-vram's logged values x T/(T-1) = {res.hf_loss_scale:.5f}: the Trainer counts T labels a row)"
        lines.append(f"mean loss logged at step 1 / {last}: hf-vram {hf_at[1]:.4f} / {hf_at[last]:.4f}, "
                     f"plain {res.plain_losses[1]:.4f} / {res.plain_losses[last]:.4f}{note}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps of each side (default 100)")
    ap.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing (default 10)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--compile", action="store_true", help="torch.compile both sides (slow to start on a CPU)")
    ap.add_argument("--order", choices=("interleaved", "hf-first", "plain-first"), default="interleaved",
                    help="interleaved (default): one step of each in turn, both meet the same load of a shared CPU; "
                         "else one whole run after the other")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads of both sides; 0 (default): the count with the fastest matmul, measured first")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another recipe override")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warmup = max(1, min(args.warmup, args.steps - 1))
    c = SMALL_GPT2
    m, k, n = args.batch * c["n_positions"], c["n_embd"], 4 * c["n_embd"]
    threads_note = ""
    if not torch.cuda.is_available():
        if args.threads:
            torch.set_num_threads(args.threads)
        else:
            _, rates = pick_threads(m, k, n)
            threads_note = f" (picked by matmul rate: {rates})"

    from hf_vram.recipe.load import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        source, what = corpus(Path(tmp))
        overrides = overrides_for(SMALL_GPT2, source, Path(tmp) / "out", args.batch, args.steps, args.compile,
                                  tuple(args.set))
        loaded = load_recipe(RECIPE, overrides)
        res = compare(loaded, warmup=warmup, compile_=args.compile, order=args.order)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if res.precision.startswith("bf16") else torch.float32
    peak = matmul_rate(m, k, n, dtype, device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s){threads_note}, load average {os.getloadavg()[0]:.1f}"
    header = (f"GPT-2 {c['n_layer']}x{c['n_embd']} ({c['n_head']} heads), block {c['n_positions']}, batch {args.batch}, "
              f"from {RECIPE.name} with overrides, on {what}; {where}")
    for line in report(res, peak, f"{str(dtype).removeprefix('torch.')} mm {m}x{k} @ {k}x{n}, best of 7", header):
        print(line, flush=True)


if __name__ == "__main__":
    main()
