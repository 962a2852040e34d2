"""Long context on a 12 GB card, checked on a lent CUDA GPU: QLoRA of an 8B Llama-3 at 4k to 32k tokens under a 12 GiB
cap, each memory saving on and off, measured against `hf-vram plan`; the longest sequence that trains; tokens/s of
hf-vram against plain trl `SFTTrainer` defaults on the same model, data and batch.

    python bench/gpu_longctx_check.py --out gpu_longctx.md [--budget-s 230]   # a lent GPU, within the budget
    python bench/gpu_longctx_check.py --dry-run --out /tmp/longctx.md         # the same code on the CPU, tiny

Everything trains through the runner: a shipped recipe with overrides (a local base, generated Alpaca-shaped data,
batch 1, one step) -> hf_vram.recipe.load.load_recipe -> hf_vram.runners.run.setup and finish. The one stand-in is the
weights: no Hub and no 16 GB checkpoint to write, so `from_pretrained` is replaced by `random_weights`, which builds
the saved config's model on the GPU, each linear layer of the blocks drawn in bf16 and quantized to NF4 by
bitsandbytes at once (as transformers quantizes a checkpoint while loading it), and marks it loaded in 4 bits as
transformers does; the rest of build_model (prepare_model_for_kbit_training, the memory savings, peft) runs as it is.

1. llama3-8b-qlora-longctx with every saving on (quant.unquantized_dtype compute, train.fused_loss,
   train.activation_offloading, train.tiled_mlp; train.kernels auto: liger-kernel where installed), then with each
   of the four off in turn; for each, 4k, 8k, 16k and 32k tokens, shortest first, one step each, and a length after
   an out-of-memory is skipped (one setup() per setting: the prepared rows are cut to each length). The cap is
   torch.cuda.set_per_process_memory_fraction at 12 GiB less the plan's CUDA context (what a 12 GB card leaves the
   allocator); the peaks are those finish() records (max_memory_allocated / reserved). Beside each, the plan of the
   same recipe for an RTX 4070 (hf_vram.vram.plan.plan_recipe) and whether it predicts a fit.
2. The longest sequence that trains with every saving on (doubling from the longest of 1., then halving the gap to a
   4,096-token step), against the plan's (hf_vram.vram.plan.longest_context, `hf-vram plan --longest`).
3. Tokens/s at 2,048 tokens, batch 1: llama3-8b-qlora-chat with its own settings (the savings left to auto) against
   plain trl (bench/bench_qlora.py's plain_trainer: SFTConfig defaults), one step of each in turn; both models are
   resident, so without the cap.
Each section ends when its share of --budget-s is spent (skipped cases are listed), and the table is written to --out
as rows come. --dry-run: a tiny Llama on the CPU in fp32 (bitsandbytes' CPU 4-bit), short lengths, and a cap counted
by hf_vram/vram/measure.py's storage tracker, which raises torch's OutOfMemoryError past it.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_qlora as bq  # noqa: E402

from hf_vram.vram.estimate import CUDA_CONTEXT, GiB  # noqa: E402
from hf_vram.vram.gpus import GPU, get_gpu  # noqa: E402
from hf_vram.vram.known_configs import KNOWN_CONFIGS  # noqa: E402

LONG_RECIPE = "llama3-8b-qlora-longctx"  # every saving on, 32k tokens: sections 1 and 2
SPEED_RECIPE = "llama3-8b-qlora-chat"  # the savings left to `auto`: section 3 at 2,048 tokens
LLAMA3_8B = {k: v for k, v in KNOWN_CONFIGS["NousResearch/Meta-Llama-3-8B-Instruct"].items() if k != "model_type"}
# Llama-3.1's position range (its RoPE scaling left out: it changes no tensor's size).
LLAMA3_8B.update(max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 8192}
TINY_VOCAB = 512
# The dry run's cap on live tensors (MiB): the tiny model trains at 64 and 128 tokens within it (1.6 MiB at most) and
# not at 512 (3 MiB and more), so that the out-of-memory path, the skips after it and the bisection of the longest
# search run in the suite too.
DRY_CAP_MIB = 2.4
ALL_ON = ["quant.unquantized_dtype=compute", "train.fused_loss=true", "train.activation_offloading=true",
          "train.tiled_mlp=true", "train.kernels=auto"]
SETTINGS = [("all savings on", None), ("unquantized fp32", "quant.unquantized_dtype=float32"),
            ("fused loss off", "train.fused_loss=false"), ("offloading off", "train.activation_offloading=false"),
            ("tiled MLP off", "train.tiled_mlp=false")]


@dataclass
class Scale:
    """What differs between the real check and its dry run: sizes, lengths, the cap and the card planned for."""

    fields: dict
    vocab: int
    lengths: tuple[int, ...]
    search_step: int  # granularity of the longest-sequence search
    search_max: int  # the longest sequence the search tries
    speed_length: int
    speed_steps: int
    cap: int  # bytes the allocator (or the dry run's tracker) may hold
    gpu: GPU  # the card the plan is made for: an RTX 4070, or for the dry run one of the cap's size
    cuda: bool
    strict: bool  # the dry run stops at any error that is not out-of-memory; the GPU run records it and goes on

    @classmethod
    def real(cls, cap_gib: float) -> Scale:
        gpu = get_gpu("rtx4070")
        if cap_gib != gpu.memory_gib:
            gpu = GPU(f"{cap_gib:g} GiB card", cap_gib, gpu.bf16_tflops)
        return cls(LLAMA3_8B, LLAMA3_8B["vocab_size"], (4096, 8192, 16384, 32768), 4096, 131072, 2048, 8,
                   int(cap_gib * GiB) - CUDA_CONTEXT, gpu, True, False)

    @classmethod
    def dry(cls, cap_mib: float) -> Scale:
        cap = int(cap_mib * 2**20)
        gpu = GPU(f"dry-run cap of {cap_mib:g} MiB", (cap + CUDA_CONTEXT) / GiB, 1.0)
        return cls(TINY, TINY_VOCAB, (64, 128, 512), 64, 1024, 128, 4, cap, gpu, False, True)


@dataclass
class Clock:
    """The time budget: each section gets until its own deadline, and a case that would end past it is skipped."""

    start: float
    budget: float
    step_seconds: dict[int, float] = field(default_factory=dict)  # tokens -> seconds of one step, as measured
    prepare_seconds: float = 0.0
    warm: bool = False  # the process's first step is not a measure: it compiles liger's Triton kernels, warms cuBLAS

    def left(self, share_end: float) -> float:
        return self.start + self.budget * share_end - time.time()

    def record(self, tokens: int, seconds: float) -> None:
        if self.warm:
            self.step_seconds[tokens] = min(seconds, self.step_seconds.get(tokens, seconds))
        self.warm = True

    def guess(self, tokens: int, prepare: bool) -> float:
        """Seconds a step of `tokens` will take, from the nearest shorter one measured (attention grows
        quadratically, the rest linearly: a power of 1.5 in between), plus a setup() when one is needed."""
        shorter = [t for t in self.step_seconds if t <= tokens]
        step = 0.0
        if shorter:
            t = max(shorter)
            step = self.step_seconds[t] * (tokens / t) ** 1.5
        return step + (self.prepare_seconds if prepare else 0.0)


class Table:
    """Markdown lines appended to --out as they come (a run cut short keeps what it measured)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")

    def add(self, *lines: str) -> None:
        with self.path.open("a") as f:
            for line in lines:
                f.write(line + "\n")
                print(line, flush=True)


# ------------------------------------------------------------------------------------------------ random weights


def _materialize(model, device: torch.device, dtype: torch.dtype, std: float) -> None:
    """Parameters and buffers left on the meta device get real values: norms 1, biases 0, the rest N(0, std);
    rotary embeddings are built again on the device (their inverse frequencies are computed, not loaded)."""
    for name, module in list(model.named_modules()):
        rotary = hasattr(module, "rope_type") or "rotary" in type(module).__name__.lower()
        if rotary and any(b.is_meta for b in module.buffers(recurse=False)):
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            with torch.device(device):  # the constructor's signature varies across transformers versions
                setattr(parent, name.rpartition(".")[2], type(module)(config=model.config))
    for module in model.modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            value = torch.empty(p.shape, dtype=dtype, device=device)
            if "norm" in type(module).__name__.lower():
                value.fill_(1.0)
            elif pname == "bias":
                value.zero_()
            else:
                value.normal_(0.0, std)
            setattr(module, pname, torch.nn.Parameter(value, requires_grad=p.requires_grad))
        for bname, b in list(module.named_buffers(recurse=False)):
            if b.is_meta:
                raise RuntimeError(f"random_weights: buffer {bname} of {type(module).__name__} has no known value")


def _quantize_linears(model, quant, device: torch.device, dtype: torch.dtype, std: float) -> int:
    """Every nn.Linear but the LM head becomes bitsandbytes' Linear4bit, its weight drawn in `dtype` on the device
    and quantized there at once, so that only one layer's full-precision weight exists at a time."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not torch.nn.Linear or child is head:
                continue
            kw = dict(compress_statistics=quant.bnb_4bit_use_double_quant, quant_type=quant.bnb_4bit_quant_type,
                      quant_storage=quant.bnb_4bit_quant_storage)
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=quant.bnb_4bit_compute_dtype, device="meta", **kw)
            w = torch.empty(child.out_features, child.in_features, dtype=dtype, device=device).normal_(0.0, std)
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, module=q, **kw).to(device)
            del w
            if child.bias is not None:
                q.bias = torch.nn.Parameter(torch.zeros(child.out_features, dtype=dtype, device=device))
            q.source_cls = torch.nn.Linear
            q.requires_grad_(False)
            setattr(module, child_name, q)
            count += 1
    return count


def random_weights(ref, *args, quantization_config=None, dtype=None, device_map=None, attn_implementation=None,
                   **kwargs):
    """Stand-in for AutoModelForCausalLM.from_pretrained: the saved config's model with random weights (seed 0,
    so that every build is the same model), built on the device of device_map, quantized as quantization_config
    says, and marked as transformers marks a model it loaded in 4 bits."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers import AutoHfQuantizer

    config = AutoConfig.from_pretrained(ref)
    if dtype in (None, "auto"):
        dtype = getattr(config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    where = next(iter((device_map or {"": "cpu"}).values()))
    device = torch.device(f"cuda:{where}" if isinstance(where, int) else where)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    std = getattr(config, "initializer_range", 0.02)
    if quantization_config is not None:
        if not quantization_config.load_in_4bit:
            raise NotImplementedError("random_weights: 4-bit bases only")
        _quantize_linears(model, quantization_config, device, dtype, std)
    _materialize(model, device, dtype, std)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if quantization_config is not None:
        model.hf_quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
        model.config.quantization_config = quantization_config
        model.is_quantized = True
        model.quantization_method = quantization_config.quant_method
        model.is_loaded_in_4bit = True
    model.config._name_or_path = str(ref)
    return model.eval()


@contextmanager
def random_pretrained():
    from unittest import mock

    from transformers import AutoModelForCausalLM

    with mock.patch.object(AutoModelForCausalLM, "from_pretrained", random_weights):
        yield


# ------------------------------------------------------------------------------------------------ recipes and runs


def overrides(base: Path, data: Path, out: Path, length: int, steps: int = 1) -> list[str]:
    """The shipped recipe made local and short: this base and data, batch 1, `steps` steps, nothing else in them."""
    return [f"model.name_or_path={base}", f"data.source={data}", "data.format=alpaca", "data.split=train",
            "data.val_size=0", f"data.max_length={length}", f"train.output_dir={out}", "train.micro_batch_size=1",
            "train.grad_accum=1", f"train.max_steps={steps}", "train.warmup=0", "train.logging_steps=1",
            f"train.save_steps={steps + 1000}", "train.report_to=[]", "train.auto_fit=false"]


def long_data(path: Path, vocab: int, tokens: int, records: int) -> Path:
    """Alpaca records whose responses alone are longer than `tokens` (one word a token), cut to the length asked."""
    return bq.alpaca_jsonl(path, vocab, records, prompt_words=(8, 16), response_words=(tokens + 8, tokens + 8))


def cut_to(dataset, tokens: int):
    """The prepared rows cut to `tokens`: the same data at a shorter length, without preparing the run again."""
    seq = [c for c in dataset.column_names if isinstance(dataset[0][c], list)]
    return dataset.map(lambda row: {c: row[c][:tokens] for c in seq})


def savings_in(run) -> str:
    """What the prepared run trains with, read off the model and trainer (not from the runner's own log)."""
    model, trainer = run.trainer.model, run.trainer
    head = model.get_output_embeddings()
    tiled = sum(1 for m in model.modules() if hasattr(m, "_untiled_forward"))
    liger = any(type(m).__name__.startswith("Liger") for m in model.modules()) or any(
        "liger" in getattr(getattr(m, "forward", None), "__module__", "") for m in model.modules())
    offload = type(getattr(trainer, "maybe_activation_offload_context", None)).__name__
    loss = "full logits" if trainer.compute_loss_func is not None else "fused"
    return (f"lm_head {str(head.weight.dtype).removeprefix('torch.')}, loss {loss}, offload {offload}, "
            f"tiled MLPs {tiled}, liger {'yes' if liger else 'no'}")


def is_oom(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower() or "ALLOC_FAILED" in text


def _tracker(cap: int, model):
    """The dry run's cap: live tensor storages counted by hf-vram's step tracker, the model's own first; past
    `cap` bytes an op raises torch.OutOfMemoryError, as the CUDA allocator does past its memory fraction."""
    from hf_vram.vram.measure import PeakTracker, model_tensors

    class Capped(PeakTracker):
        def track(self, t) -> None:
            super().track(t)
            if self.current > cap:
                raise torch.OutOfMemoryError(f"dry-run cap: {self.current:,} bytes live > {cap:,}")

    tracker = Capped()
    for t in model_tensors(model):
        tracker.track(t)
    return tracker


def train_once(run, scale: Scale) -> dict:
    """One finish() of a prepared run under the cap: status ok / OOM / error, peaks (GiB), seconds, loss."""
    from hf_vram.runners.run import finish

    if scale.cuda:
        torch.cuda.empty_cache()  # the reserved peak starts from what is held, cached blocks of the last length too
    tracker = None if scale.cuda else _tracker(scale.cap, run.trainer.model)
    t0 = time.perf_counter()
    try:
        with tracker if tracker is not None else nullcontext():
            summary = finish(run)
    except Exception as e:  # an OOM is a result; other errors are recorded on the GPU, raised in the dry run
        seconds = time.perf_counter() - t0
        if is_oom(e):
            reached = torch.cuda.max_memory_reserved() if scale.cuda else tracker.peak
            return {"status": "OOM", "seconds": seconds, "reserved": reached / GiB}
        if scale.strict:
            raise
        return {"status": f"error: {type(e).__name__}: {str(e)[:160]}", "seconds": seconds}
    finally:
        if tracker is not None:
            tracker.close()
    seconds = time.perf_counter() - t0
    if scale.cuda:
        alloc, reserved = summary["cuda_max_allocated_bytes"], summary["cuda_max_reserved_bytes"]
    else:
        alloc = reserved = tracker.peak
    return {"status": "ok", "seconds": seconds, "allocated": alloc / GiB, "reserved": reserved / GiB,
            "loss": summary.get("final_loss")}


def reclaim() -> None:
    """Collect a dropped run (peft models hold reference cycles) and give its memory back before the next one."""
    gc.collect()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def leftover() -> float:
    return torch.cuda.memory_allocated() / GiB if torch.cuda.is_available() else 0.0


# ------------------------------------------------------------------------------------------------ the plan


def planned(loaded, scale: Scale) -> dict:
    """`hf-vram plan` for the recipe on the scale's card: the step peak (what max_memory_allocated sees) and the
    step peak with allocator slack (max_memory_reserved), both without the CUDA context, and whether it fits."""
    from hf_vram.vram.plan import plan_recipe

    plan = plan_recipe(loaded, scale.gpu)
    return {"plan_allocated": plan.step_peak / GiB, "plan_reserved": (plan.peak - CUDA_CONTEXT) / GiB,
            "plan_fits": plan.fits}


def plan_longest(loaded, scale: Scale) -> int:
    """`hf-vram plan --longest` for the recipe as it is (every saving on) on the scale's card."""
    from hf_vram.vram.plan import longest_context, planning_inputs

    config, counts, _ = planning_inputs(loaded)
    if scale.cuda:
        return longest_context(config, loaded.recipe, scale.gpu, counts)
    # The dry run trains on the CPU (fp32, the CPU fused head): its plan is the CPU estimate's, as `plan --measure`
    # compares it, scanned over the search's lengths.
    from hf_vram.vram.compare import predicted_for_cpu
    from hf_vram.vram.plan import with_setting

    one = with_setting(loaded.recipe, "train.micro_batch_size", 1)
    fits = [n for n in range(scale.search_step, scale.search_max + 1, scale.search_step)
            if predicted_for_cpu(config, with_setting(one, "data.max_length", n)).step_peak <= scale.cap]
    return max(fits, default=0)


# ------------------------------------------------------------------------------------------------ sections


SWEEP_END, LONGEST_END = 0.6, 0.8  # shares of the budget by which each section ends; tokens/s gets the rest


def gib(x) -> str:
    return f"{x:.2f}" if isinstance(x, float) else "-"


def row_line(row: dict) -> str:
    err = "-"
    if row.get("reserved") and row["status"] == "ok":
        err = f"{(row['plan_reserved'] - row['reserved']) / row['reserved']:+.1%}"
    agree = "-"
    if row["status"] in ("ok", "OOM"):
        agree = "yes" if row["plan_fits"] == (row["status"] == "ok") else "NO"
    secs = f"{row['seconds']:.1f}" if "seconds" in row else "-"
    return (f"| {row['setting']} | {row['tokens']:,} | {row['status']} | {gib(row.get('allocated'))} | "
            f"{gib(row.get('reserved'))} | {gib(row['plan_allocated'])} | {gib(row['plan_reserved'])} | "
            f"{'fits' if row['plan_fits'] else 'no'} | {agree} | {err} | {secs} | {row.get('savings', '-')} |")


@dataclass
class Work:
    """The temporary folder, the base (config and tokenizer only) and the scale of this run."""

    root: Path
    base: Path
    scale: Scale

    def load(self, data: Path, name: str, tokens: int, extra: list[str], steps: int = 1, recipe: str = LONG_RECIPE):
        from hf_vram.recipe.load import load_recipe

        out = self.root / "runs" / name
        return load_recipe(recipe, overrides(self.base, data, out, tokens, steps) + extra)

    def setup(self, loaded, clock: Clock):
        from hf_vram.runners.run import setup

        shutil.rmtree(loaded.output_dir, ignore_errors=True)  # a run's output must not look like one to resume
        t0 = time.perf_counter()
        with random_pretrained():
            run = setup(loaded)
        clock.prepare_seconds = max(clock.prepare_seconds, time.perf_counter() - t0)
        return run, run.trainer.train_dataset


def sweep_setting(work: Work, clock: Clock, table: Table, name: str, change: str | None, data: Path) -> int:
    """One setting at every length, shortest first; returns the longest that trained (0: none)."""
    scale = work.scale
    extra = ALL_ON + ([change] if change else [])
    slug = name.replace(" ", "-")
    run = rows = None
    best, failed = 0, False
    for tokens in scale.lengths:
        row = {"setting": name, "tokens": tokens, **planned(work.load(data, slug, tokens, extra), scale)}
        if failed:
            row["status"] = "skipped: a shorter one did not train"
        elif clock.guess(tokens, run is None) > clock.left(SWEEP_END):
            row["status"] = "skipped: time"
        else:
            if run is None:
                # What an earlier run left on the card would count in this one's peaks: shown, to be ~0.
                row["left_before_gib"] = round(leftover(), 3)
                run, rows = work.setup(work.load(data, slug, max(scale.lengths), extra), clock)
            run.trainer.train_dataset = cut_to(rows, tokens)
            row.update(train_once(run, scale), savings=savings_in(run))
            if row["status"] == "ok":
                best = tokens
                clock.record(tokens, row["seconds"])
            else:
                failed = True
                run = rows = None  # a step cut short by an OOM leaves the trainer half-way: not reused
                reclaim()
        table.add(row_line(row))
        print(json.dumps({"row": row}), flush=True)
    run = rows = None
    reclaim()
    return best


def sweep(work: Work, clock: Clock, table: Table) -> int:
    """Section 1; returns the longest length that trained with all savings on."""
    scale = work.scale
    data = long_data(work.root / "sweep.jsonl", scale.vocab, max(scale.lengths), records=2)
    cap = f"{(scale.cap + CUDA_CONTEXT) / GiB:.1f} GiB card (allocator capped at {scale.cap / GiB:.2f} GiB)"
    table.add(f"\n### Each saving on and off, batch 1, one step, {cap}\n",
              "| setting | tokens | result | allocated GiB | reserved GiB | plan allocated GiB | plan reserved GiB "
              "| plan | plan right | plan error (reserved) | s | what trained |", "|---" * 12 + "|")
    best = {}
    for name, change in SETTINGS:
        best[name] = sweep_setting(work, clock, table, name, change, data)
    return best["all savings on"]


def next_probe(lo: int, hi: int | None, scale: Scale) -> int | None:
    """Doubling while nothing has failed, then the middle of the gap (multiples of search_step)."""
    if hi is None:
        nxt = 2 * lo if lo else scale.lengths[0]
        return nxt if nxt <= scale.search_max else None
    mid = (lo + hi) // (2 * scale.search_step) * scale.search_step
    return mid if hi - lo > scale.search_step and mid > lo else None


def longest(work: Work, clock: Clock, table: Table, start: int) -> None:
    """Section 2: the longest sequence that trains with all savings on, against the plan's."""
    scale = work.scale
    data = long_data(work.root / "longest.jsonl", scale.vocab, scale.search_max, records=2)
    predicted = plan_longest(work.load(data, "longest", scale.search_max, ALL_ON), scale)
    lo, hi, run, rows, probes, note = start, None, None, None, [], ""
    while (tokens := next_probe(lo, hi, scale)) is not None:
        if clock.guess(tokens, run is None) > clock.left(LONGEST_END):
            note = f"; stopped before {tokens:,} tokens (time)"
            break
        if run is None:
            run, rows = work.setup(work.load(data, "longest", scale.search_max, ALL_ON), clock)
        run.trainer.train_dataset = cut_to(rows, tokens)
        result = train_once(run, scale)
        peak = f" {result['reserved']:.2f} GiB" if "reserved" in result else ""
        probes.append(f"{tokens:,} {result['status']}{peak}")
        if result["status"] == "ok":
            lo = tokens
            clock.record(tokens, result["seconds"])
        else:
            hi, run, rows = tokens, None, None
            reclaim()
    run = rows = None
    reclaim()
    bound = f" (the search stops at {scale.search_max:,})" if lo >= scale.search_max else ""
    table.add("\n### Longest sequence that trains, all savings on, batch 1\n",
              f"measured: {lo:,} tokens{bound}; plan: {predicted:,} tokens; probes beyond the sweep: "
              f"{', '.join(probes) or 'none'}{note}")
    print(json.dumps({"longest": {"measured": lo, "plan": predicted, "probes": probes}}), flush=True)


def speed(work: Work, clock: Clock, table: Table) -> None:
    """Section 3: the recipe's own settings at speed_length tokens against plain trl, one step of each in turn."""
    from hf_vram.runners.run import finish

    scale = work.scale
    steps, warmup = scale.speed_steps, 2 if scale.cuda else 1
    table.add(f"\n### Tokens/s at {scale.speed_length:,} tokens, batch 1: {SPEED_RECIPE} as it is against plain trl "
              "SFTTrainer defaults (both models resident: no cap)\n")
    need = 2 * clock.prepare_seconds + 2 * steps * clock.guess(scale.speed_length, False)
    if need > clock.left(1.0):
        table.add(f"skipped: about {need:.0f} s needed, {max(0.0, clock.left(1.0)):.0f} s left")
        return
    if scale.cuda:
        torch.cuda.set_per_process_memory_fraction(1.0)
    data = long_data(work.root / "speed.jsonl", scale.vocab, scale.speed_length, records=steps)
    loaded = work.load(data, "speed", scale.speed_length, ["train.logging_steps=10"], steps=steps, recipe=SPEED_RECIPE)
    run, rows = work.setup(loaded, clock)
    with random_pretrained():
        plain = bq.plain_trainer(str(work.base), rows, run.tokenizer, loaded.recipe.adapter, batch=1,
                                 max_length=scale.speed_length, steps=steps, out=work.root / "plain",
                                 bf16=run.trainer.args.bf16)
    sides = [bq.Side(f"hf-vram ({SPEED_RECIPE})", run.trainer, lambda: finish(run)),
             bq.Side("plain trl SFTTrainer (defaults)", plain, plain.train)]
    bq.interleave(sides)
    hf, pl = (s.tokens_per_second(warmup) for s in sides)
    table.add("| side | tokens/s | median ms/step | settings |", "|---|---|---|---|",
              *(f"| {s.name} | {s.tokens_per_second(warmup):,.0f} | {s.median_ms(warmup):.0f} | "
                f"{bq.settings_of(s.trainer)}; {savings_in(run) if s.trainer is run.trainer else 'as loaded'} |"
                for s in sides),
              f"\nratio hf-vram / plain: {hf / pl:.3f} (goal >= 1.5; {steps - warmup} timed steps of each, "
              f"{warmup} untimed; loss at step 1: " + ", ".join(f"{s.name} {s.first_loss():.4f}" for s in sides
                                                            if s.first_loss() is not None) + ")")
    print(json.dumps({"speed": {"hf_vram": hf, "plain": pl, "ratio": hf / pl}}), flush=True)


def header(scale: Scale) -> list[str]:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "not installed"

    where = torch.cuda.get_device_name() if scale.cuda else "CPU (dry run: tiny Llama, fp32, no comparison)"
    c = scale.fields
    return [f"## Long-context QLoRA on {where}",
            f"\n{LONG_RECIPE} (sections 1, 2) and {SPEED_RECIPE} (3) with a random Llama "
            f"{c['num_hidden_layers']} x {c['hidden_size']} (MLP "
            f"{c['intermediate_size']}, {c['num_attention_heads']}/{c['num_key_value_heads']} heads, vocabulary "
            f"{scale.vocab:,}) built by random_weights in NF4; plan: `hf-vram plan` for {scale.gpu.name}.",
            "versions: " + ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "peft", "trl",
                                                                   "bitsandbytes", "accelerate", "liger-kernel"))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_longctx.md"))
    ap.add_argument("--dry-run", action="store_true", help="the same code on the CPU: tiny Llama, short lengths")
    ap.add_argument("--budget-s", type=float, default=None, help="seconds for all sections (default 230; dry 600)")
    ap.add_argument("--cap-gib", type=float, default=12.0, help="the card's memory (default 12: an RTX 4070)")
    ap.add_argument("--dry-cap-mib", type=float, default=DRY_CAP_MIB, help="the dry run's cap on live tensors")
    args = ap.parse_args()
    start = time.time()
    scale = Scale.dry(args.dry_cap_mib) if args.dry_run else Scale.real(args.cap_gib)
    if scale.cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run on a CPU")
    clock = Clock(start, args.budget_s or (600.0 if args.dry_run else 230.0))
    table = Table(args.out)
    table.add(*header(scale))
    with tempfile.TemporaryDirectory() as tmp:
        fields = {**scale.fields, "dtype": "bfloat16"} if scale.cuda else scale.fields
        base = bq.write_base(Path(tmp) / "base", fields, scale.vocab, weights=False)
        work = Work(Path(tmp), base, scale)
        if scale.cuda:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, scale.cap / total))
        best = sweep(work, clock, table)
        longest(work, clock, table, best)
        speed(work, clock, table)
    table.add(f"\n{time.time() - start:.0f} s in all (budget {clock.budget:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
