"""Tokens/s and model FLOPs utilisation of GPT-2 124M pretraining on a CUDA card: hf-vram (recipes/gpt2-124m-fineweb.yaml
with overrides: a short run on generated token data, bf16, fused AdamW, torch.compile) against the minimal nanoGPT-style
loop of bench/bench_train.py on the same model, blocks, batch, optimizer, clipping and precision, in this run.

    python bench/gpu_gpt2_mfu.py --out gpt2_mfu.md       # a lent H100: under 3 minutes (two compiles included)
    python bench/gpu_gpt2_mfu.py --dry-run               # the same code path on a CPU: tiny GPT-2, fp32, no compile

MFU = nanoGPT's FLOPs per token (6N + 12·L·H·Q·T) x tokens/s, over (a) the card's dense bf16 peak from
hf_vram/vram/gpus.py when torch.cuda.get_device_name() names a card there, else the measured rate, and (b) a bf16
matmul rate measured in this run at the model's size, (B·T x 768) @ (768 x 3072). The results table is written to
--out as the run goes (the device and peaks first, then the two rows).

Offline by design (a lent machine reaches nothing outside it): the GPT-2 tokenizer is replaced by a word-level one with
GPT-2's 50,257 entries, built here, and the corpus is random token ids written as text. Needs the project's
dependencies (trl, pydantic, datasets besides torch and transformers): on a machine whose image lacks them, carry them
as wheels.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_train as bt  # noqa: E402

RECIPE = bt.ROOT / "recipes" / "gpt2-124m-fineweb.yaml"
EOT = "<|endoftext|>"
GPT2_VOCAB = 50257
TINY_GPT2 = {"n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 64}  # --dry-run


def word_tokenizer(folder: Path, vocab_size: int, max_length: int) -> Path:
    """A tokenizer of `vocab_size` entries, GPT-2's layout (ids 0 .. vocab_size - 2 are words t0, t1, ...; the last
    is <|endoftext|>, GPT-2's BOS, EOS and pad), saved where AutoTokenizer loads it without the Hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size - 1)}
    vocab[EOT] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOT))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, bos_token=EOT, eos_token=EOT,
                                   unk_token=EOT, pad_token=EOT)
    fast.save_pretrained(folder)
    return folder


def token_text(path: Path, vocab_size: int, tokens: int, seed: int = 0) -> Path:
    """Random word ids as one text file: `tokens` tokens once tokenized by word_tokenizer."""
    rng = random.Random(seed)
    path.write_text(" ".join(f"t{rng.randrange(vocab_size - 1)}" for _ in range(tokens)))
    return path


def card_peak() -> tuple[float | None, str]:
    """(dense bf16 FLOP/s, name) of the CUDA card from hf-vram's table, or (None, why) when it is not there."""
    from hf_vram.vram.gpus import GPUS

    name = torch.cuda.get_device_name()
    for gpu in GPUS.values():
        model = gpu.name.split()[1]  # "H100", "A100", "4090", ...: as hf_vram/vram/plan.py's current_gpu matches
        if model in name:
            note = ""
            if model == "H100" and ("PCIe" in name or "NVL" in name):
                note = "; the table's figure is the SXM part's, this card's own peak is lower"
            return gpu.bf16_tflops * 1e12, (f"{gpu.name} dense bf16 {gpu.bf16_tflops:g} TFLOP/s "
                                            f"(hf_vram/vram/gpus.py, matched '{name}'{note})")
    return None, f"{name} is not in hf_vram/vram/gpus.py"


class Table:
    """A markdown file rewritten whole after each addition, so that a run cut short leaves what it measured."""

    def __init__(self, path: Path | None):
        self.path, self.lines = path, []

    def add(self, *lines: str) -> None:
        self.lines += lines
        for line in lines:
            print(line, flush=True)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("\n".join(self.lines) + "\n")


@dataclass
class Setup:
    """What one run measures: sizes, steps and the device, from the command line (--dry-run: tiny, on the CPU)."""

    dry: bool
    steps: int
    warmup: int
    batch: int
    compile_: bool
    config: dict
    vocab: int
    device: torch.device

    @property
    def seq(self) -> int:
        return self.config["n_positions"]

    @property
    def matmul(self) -> tuple[int, int, int]:
        """The model's MLP matmul at this micro-batch: (B·T x H) @ (H x 4H)."""
        return self.batch * self.seq, self.config["n_embd"], 4 * self.config["n_embd"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="markdown file for the results table")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps of each side (default 40; dry run 6)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="first steps left out of the timing, compilation included (default 10; dry run 2)")
    ap.add_argument("--batch", type=int, default=None, help="micro-batch (default 16 x 1024 tokens; dry run 4 x 64)")
    ap.add_argument("--order", choices=("hf-first", "plain-first", "interleaved"), default="hf-first")
    ap.add_argument("--no-compile", action="store_true", help="eager on both sides")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny GPT-2, fp32, no compile: the code path only")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another recipe override")
    return ap.parse_args(argv)


def setup(args: argparse.Namespace) -> Setup:
    """The run's sizes; offline, and on the CPU for a dry run even where a card is present."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_gpt2_mfu: no CUDA device; --dry-run runs the same code on the CPU at a tiny size")
    if dry:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the CPU even where a card is present
    steps = args.steps or (6 if dry else 40)
    return Setup(
        dry=dry,
        steps=steps,
        warmup=max(1, min(args.warmup if args.warmup is not None else (2 if dry else 10), steps - 1)),
        batch=args.batch or (4 if dry else 16),
        compile_=not (dry or args.no_compile),
        config=dict(TINY_GPT2) if dry else {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024},
        vocab=512 if dry else GPT2_VOCAB,
        device=torch.device("cpu" if dry else "cuda"),
    )


def write_peaks(table: Table, run: Setup) -> tuple[float, float]:
    """(peak for MFU, matmul rate measured here), written first: a run cut short still leaves them."""
    mm = run.matmul
    where = torch.cuda.get_device_name() if not run.dry else f"CPU, {bt.pick_threads(*mm)[0]} thread(s)"
    table.add(f"# GPT-2 {'(dry run, tiny) ' if run.dry else '124M '}pretraining: hf-vram against a plain loop",
              "", f"- device: {where}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M:%S')}")
    mm_dtype = torch.float32 if run.dry else torch.bfloat16
    measured = bt.matmul_rate(*mm, mm_dtype, run.device)
    mm_label = f"{str(mm_dtype).removeprefix('torch.')} mm {mm[0]}x{mm[1]} @ {mm[1]}x{mm[2]}, best of 7"
    if run.dry:
        peak, peak_label = measured, f"measured {mm_label} (dry run: no card)"
    else:
        peak, peak_label = card_peak()
        if peak is None:
            peak, peak_label = measured, f"measured {mm_label} ({peak_label})"
    table.add(f"- matmul rate measured in this run ({mm_label}): {measured / 1e12:.3f} TFLOP/s",
              f"- peak for MFU: {peak_label}")
    return peak, measured


def run_both(table: Table, run: Setup, args: argparse.Namespace):
    """(bench_train's comparison of the two sides, seconds both took) on generated token data in a temp folder."""
    from hf_vram.recipe.load import load_recipe

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer_dir = word_tokenizer(tmp / "tokenizer", run.vocab, run.seq)
        # Windows start every 64 tokens: 16 x 40 blocks of 1024 come from about 200k tokens of text.
        stride = 16 if run.dry else 64
        text = token_text(tmp / "tokens.txt", run.vocab, max(20_000, (run.steps * run.batch + 8) * stride + run.seq))
        overrides = bt.overrides_for(run.config, text, tmp / "out", run.batch, run.steps, run.compile_, extra=(
            f"tokenizer.name_or_path={tokenizer_dir}", "data.subset=null", f"data.block_stride={stride}",
            "train.warmup=5", "train.auto_fit=false", "train.logging_steps=10",
            *(["train.precision=fp32"] if run.dry else []), *args.set))
        loaded = load_recipe(RECIPE, overrides)
        t = loaded.recipe.train
        table.add(f"- recipe: {RECIPE.name} + overrides: {' '.join(o for o in overrides if 'source=' not in o and 'output_dir=' not in o and 'name_or_path=' not in o)}",
                  f"- micro-batch {run.batch} x {run.seq} tokens, grad_accum 1, {run.steps} steps ({run.warmup} warm-up "
                  f"steps untimed, order {args.order}); optimizer {t.optimizer}, torch_compile {t.torch_compile}, "
                  f"precision {'fp32' if run.dry else t.precision}")
        started = time.perf_counter()
        res = bt.compare(loaded, warmup=run.warmup, compile_=run.compile_, order=args.order)
        return res, time.perf_counter() - started


def write_results(table: Table, run: Setup, res, elapsed: float, peak: float, measured: float) -> None:
    hf, pl = res.hf, res.plain
    ratio = hf.tokens_per_second / pl.tokens_per_second
    rows = []
    for name, timing in (("hf-vram (pretrain, Trainer)", hf), ("plain PyTorch loop", pl)):
        tps = timing.tokens_per_second
        achieved = res.flops_per_token * tps
        rows.append(f"| {name} | {tps:,.0f} | {timing.window_seconds / timing.window_steps * 1000:.1f} | "
                    f"{achieved / 1e12:.2f} | {achieved / peak:.3f} | {achieved / measured:.3f} |")
    memory = ""
    if run.device.type == "cuda":
        memory = f"; peak CUDA memory allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (both sides)"
    table.add(
        "", f"model: N = {res.n_params / 1e6:.2f}M (position embeddings left out), FLOPs/token 6N + 12LHQT = "
        f"{res.flops_per_token / 1e9:.3f} G; both sides ran in {elapsed:.0f} s (compilation included){memory}", "",
        "| side | tokens/s | ms/step (timed window) | model TFLOP/s | MFU vs peak | MFU vs measured matmul |",
        "| --- | --- | --- | --- | --- | --- |", *rows, "",
        f"ratio hf-vram / plain       : {ratio:.3f}",
        f"MFU hf-vram                 : {res.flops_per_token * hf.tokens_per_second / peak:.3f}",
        f"MFU plain                   : {res.flops_per_token * pl.tokens_per_second / peak:.3f}",
        f"hf-vram settings : {res.hf_settings}",
        f"plain settings   : {res.plain_settings}",
    )
    if 1 in res.hf_losses and 1 in res.plain_losses:
        table.add(f"loss at step 1: hf-vram {res.hf_losses[1] * res.hf_loss_scale:.4f}, plain {res.plain_losses[1]:.4f}"
                  + (" (hf-vram's logged value x T/(T-1): the Trainer counts T labels a row)" if res.hf_loss_scale != 1 else ""))


def main() -> None:
    args = parse_args()
    run = setup(args)
    table = Table(args.out)
    peak, measured = write_peaks(table, run)
    res, elapsed = run_both(table, run, args)
    write_results(table, run, res, elapsed, peak, measured)


if __name__ == "__main__":
    main()
