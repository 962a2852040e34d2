"""QLoRA fine-tuning throughput: hf-vram's SFT path (a recipe -> hf_vram.runners.run.setup and finish) against plain trl
`SFTTrainer` with its defaults (`SFTConfig`) on the same 4-bit base, LoRA, data and batch, in one run; and what the
fused loss (train.fused_loss, trl's tiled LM head: the [tokens x vocabulary] logits never exist whole) costs against
the model's own loss on full logits.

    make bench            # or: python bench/bench_qlora.py --steps 12 [--batch 8] [--max-length 256]

The base is a small random Llama (4 layers x 256, a 16,384-word vocabulary, so that the LM head is about half of the
FLOPs, as it is for Llama-3 at short sequences), saved to a temporary folder and loaded in 4-bit NF4 by bitsandbytes
(compute in fp32 on a CPU, bf16 on a GPU). The data is Alpaca-shaped (instruction, input, output), generated: random
words of the base's own vocabulary, prompts of 8-40 words and responses of 20-200, so that batches carry padding.

The three trainers (hf-vram, hf-vram with train.fused_loss=false, plain trl) run in one process and take turns one
optimizer step at a time (each in a thread of its own that waits for its turn), so that all of them meet the same
load on a shared machine. A step is timed from the moment its trainer gets its turn to its on_step_end: the
trainer's logging, data loading and callbacks are in it. Tokens are those trl counts (attention mask), the first
--warmup steps are left out. Printed: tokens/s of each, `ratio hf-vram / plain`, and `fused loss cost`.

bench/gpu_longctx_check.py imports the helpers below for an 8B Llama on a CUDA card.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from transformers import TrainerCallback  # noqa: E402

SMALL_LLAMA = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 1024}
SMALL_VOCAB = 16384


# ------------------------------------------------------------------------------------------------ base and data


def write_tokenizer(folder: Path, vocab_size: int, max_length: int) -> None:
    """A word-level tokenizer of `vocab_size` entries (words t0, t1, ...; the last id is BOS, EOS and pad), as
    bench/gpu_gpt2_mfu.py builds GPT-2's: no Hub, and every generated word is one token."""
    from gpu_gpt2_mfu import word_tokenizer

    word_tokenizer(folder, vocab_size, max_length)


def llama_config(fields: dict, vocab_size: int):
    from transformers import LlamaConfig

    eos = vocab_size - 1
    return LlamaConfig(**{"vocab_size": vocab_size, "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos,
                          "tie_word_embeddings": False, **fields})


def write_base(folder: Path, fields: dict, vocab_size: int, weights: bool = True, seed: int = 0) -> Path:
    """A random Llama saved where from_pretrained finds it (weights=False: its config and tokenizer only, for a
    caller that builds the weights itself)."""
    from transformers import LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder, vocab_size, fields["max_position_embeddings"])
    config = llama_config(fields, vocab_size)
    if weights:
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    return folder


def alpaca_jsonl(path: Path, vocab_size: int, records: int, prompt_words: tuple[int, int] = (8, 40),
                 response_words: tuple[int, int] = (20, 200), seed: int = 0) -> Path:
    """Alpaca-shaped records (instruction, input, output) of random words t0 .. t{vocab_size - 2}."""
    rng = random.Random(seed)

    def words(lo_hi):
        return " ".join(f"t{rng.randrange(vocab_size - 1)}" for _ in range(rng.randint(*lo_hi)))

    with path.open("w") as f:
        for _ in range(records):
            record = {"instruction": words(prompt_words), "input": "", "output": words(response_words)}
            f.write(json.dumps(record) + "\n")
    return path


def qlora_recipe(base: Path, data: Path, out: Path, *, batch: int, max_length: int, steps: int, **train) -> dict:
    """hf-vram's QLoRA recipe for the bench: NF4 with double quantization, LoRA r 16 on every linear layer,
    paged 8-bit AdamW and gradient checkpointing (as the shipped 7B/8B QLoRA recipes, and as trl's default)."""
    return {
        "description": "QLoRA throughput bench",
        "model": {"name_or_path": str(base)},
        "quant": {"bits": 4, "type": "nf4", "double_quant": True},
        "adapter": {"type": "lora", "r": 16, "alpha": 16, "dropout": 0.0},
        "data": {"source": str(data), "format": "alpaca", "template": "alpaca-short", "max_length": max_length},
        "train": {"output_dir": str(out), "micro_batch_size": batch, "grad_accum": 1, "max_steps": steps,
                  "warmup": 0, "optimizer": "paged_adamw_8bit", "gradient_checkpointing": True, "logging_steps": 10,
                  "save_steps": steps + 1000, "report_to": [], **train},
    }


def load(recipe: dict, folder: Path, name: str):
    import yaml

    from hf_vram.recipe.load import load_recipe

    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return load_recipe(path)


# ------------------------------------------------------------------------------------------------ plain trl


def plain_trainer(base: str, dataset, tokenizer, adapter, *, batch: int, max_length: int, steps: int, out: Path,
                  bf16: bool):
    """What a plain trl script does: the base loaded in 4-bit NF4 by transformers (bf16 compute on a GPU, fp32 on a
    CPU, the unquantized weights in that dtype), peft's LoraConfig, `SFTConfig` defaults. Set beyond them: the
    batch, sequence length and step count, no checkpoints or loggers inside the timed steps, the loss logged at
    step 1 (to compare with hf-vram's), and the precision, which trl defaults to bf16 even on a CPU, where hf-vram
    computes in fp32: the same on both sides, so that the comparison is of the training paths."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    compute = torch.bfloat16 if bf16 else torch.float32
    device = {"": 0} if torch.cuda.is_available() else {"": "cpu"}
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=compute, device_map=device)
    lora = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules=adapter.target_modules, task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=batch, max_length=max_length, max_steps=steps,
                     save_strategy="no", report_to="none", logging_first_step=True, bf16=bf16,
                     use_cpu=not torch.cuda.is_available())
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)


def settings_of(trainer) -> str:
    """What each side trains with, for the printout."""
    a = trainer.args
    model = trainer.model
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_dtype = str(head.weight.dtype).removeprefix("torch.") if head is not None else "?"
    precision = "bf16" if a.bf16 else "fp16" if a.fp16 else "fp32"
    offload = type(getattr(trainer, "maybe_activation_offload_context", None)).__name__
    loss = "full logits (compute_loss_func)" if trainer.compute_loss_func is not None else "trl fused LM head"
    return (f"optim={getattr(a.optim, 'value', a.optim)}, {precision}, gradient_checkpointing="
            f"{a.gradient_checkpointing or getattr(model, 'is_gradient_checkpointing', False)}, lm_head {head_dtype}, "
            f"loss {loss}, step context {offload}, logging every {a.logging_steps:g} steps")


# ------------------------------------------------------------------------------------------------ taking turns


class Aborted(Exception):
    """Another side failed: this one stops at its next step."""


class Turns:
    """Several training loops, each in a thread of its own, take turns one optimizer step at a time: only the
    side whose turn it is runs, so none of them is timed while another computes."""

    def __init__(self, sides: int):
        self.cond = threading.Condition()
        self.turn = 0
        self.done = [False] * sides
        self.error: BaseException | None = None

    def wait(self, i: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == i or self.error is not None)
            if self.error is not None:
                raise Aborted()

    def pass_on(self, i: int, finished: bool = False) -> None:
        with self.cond:
            self.done[i] = self.done[i] or finished
            n = len(self.done)
            for k in range(1, n + 1):
                if not self.done[(i + k) % n]:
                    self.turn = (i + k) % n
                    break
            self.cond.notify_all()

    def fail(self, e: BaseException) -> None:
        with self.cond:
            if self.error is None:
                self.error = e
            self.cond.notify_all()


@dataclass
class StepClock(TrainerCallback):
    """Per optimizer step of one side: seconds from getting its turn to on_step_end, and the tokens trl counted."""

    turns: Turns
    index: int
    trainer: object = None
    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    _mark: float = 0.0
    _counted: int = 0

    def on_train_begin(self, args, state, control, **kw):
        self._mark = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._mark)
        counted = self.trainer._total_train_tokens  # trl's SFTTrainer: attention-mask tokens of every micro-batch
        self.tokens.append(counted - self._counted)
        self._counted = counted
        self.turns.pass_on(self.index)
        self.turns.wait(self.index)
        self._mark = time.perf_counter()


@dataclass
class Side:
    name: str
    trainer: object
    train: Callable[[], object]  # runs the whole training (hf-vram: finish(run); plain: trainer.train)
    clock: StepClock | None = None

    def tokens_per_second(self, warmup: int) -> float:
        return sum(self.clock.tokens[warmup:]) / sum(self.clock.seconds[warmup:])

    def median_ms(self, warmup: int) -> float:
        return statistics.median(self.clock.seconds[warmup:]) * 1000

    def first_loss(self) -> float | None:
        losses = [e["loss"] for e in self.trainer.state.log_history if "loss" in e]
        return losses[0] if losses else None


def interleave(sides: list[Side]) -> None:
    """Train every side to its end, one optimizer step each in turn; re-raises the first failure."""
    turns = Turns(len(sides))
    for i, side in enumerate(sides):
        side.clock = StepClock(turns, i, side.trainer)
        side.trainer.add_callback(side.clock)

    def body(i: int, side: Side) -> None:
        try:
            turns.wait(i)
            side.train()
        except Aborted:
            pass
        except BaseException as e:  # handed to the main thread, which raises it
            turns.fail(e)
        finally:
            turns.pass_on(i, finished=True)

    threads = [threading.Thread(target=body, args=(i, s), name=s.name) for i, s in enumerate(sides)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if turns.error is not None:
        raise turns.error


def report(sides: list[Side], warmup: int) -> list[str]:
    """tokens/s of every side, then each side's settings and the loss it logged at step 1."""
    steps = len(sides[0].clock.seconds)
    lines = [f"timed steps {warmup + 1}..{steps} of each side ({steps - warmup} steps, one step of each in turn)"]
    for s in sides:
        lines.append(f"{s.name:<34}: {s.tokens_per_second(warmup):12.0f} tokens/s  (median {s.median_ms(warmup):.1f} "
                     f"ms/step, {sum(s.clock.tokens[warmup:]):,} tokens)")
    for s in sides:
        lines.append(f"{s.name} settings: {settings_of(s.trainer)}")
    losses = ", ".join(f"{s.name} {s.first_loss():.4f}" for s in sides if s.first_loss() is not None)
    lines.append(f"loss at step 1 (LoRA B starts at zero: the base's loss on the same batch): {losses}")
    return lines


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps of each side (default 12)")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing (default 2)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warmup = max(1, min(args.warmup, args.steps - 1))
    from hf_vram.runners.run import finish, setup

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = write_base(tmp / "base", SMALL_LLAMA, SMALL_VOCAB)
        data = alpaca_jsonl(tmp / "alpaca.jsonl", SMALL_VOCAB, records=max(64, args.steps * args.batch * 2))
        shape = dict(batch=args.batch, max_length=args.max_length, steps=args.steps)
        fused = setup(load(qlora_recipe(base, data, tmp / "fused", **shape, fused_loss=True), tmp, "fused"))
        full = setup(load(qlora_recipe(base, data, tmp / "full", **shape, fused_loss=False), tmp, "full"))
        plain = plain_trainer(str(base), fused.trainer.train_dataset, fused.tokenizer, fused.loaded.recipe.adapter,
                              **shape, out=tmp / "plain", bf16=fused.trainer.args.bf16)
        sides = [Side("hf-vram (QLoRA, setup/finish)", fused.trainer, lambda: finish(fused)),
                 Side("hf-vram train.fused_loss=false", full.trainer, lambda: finish(full)),
                 Side("plain trl SFTTrainer (defaults)", plain, plain.train)]
        interleave(sides)
    where = (torch.cuda.get_device_name() if torch.cuda.is_available()
             else f"CPU, {torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"QLoRA NF4 of a random Llama {SMALL_LLAMA['num_hidden_layers']}x{SMALL_LLAMA['hidden_size']}, vocabulary "
          f"{SMALL_VOCAB:,}, LoRA r 16 on all linears; Alpaca-shaped generated data, batch {args.batch} x up to "
          f"{args.max_length} tokens; {where}", flush=True)
    for line in report(sides, warmup):
        print(line, flush=True)
    hf, no_fuse, pl = (s.tokens_per_second(warmup) for s in sides)
    device = "cuda" if torch.cuda.is_available() else "CPU"
    cost = no_fuse / hf - 1  # extra time per token of the fused loss
    print(f"ratio hf-vram / plain             : {hf / pl:12.3f}", flush=True)
    print(f"fused loss cost on {device}            : {cost * 100:+.1f}%  (hf-vram fused_loss=true against false; "
          f"{'within' if cost <= 0.05 else 'over'} the 5% allowed)", flush=True)


if __name__ == "__main__":
    main()
