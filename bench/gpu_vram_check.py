"""Predicted against measured VRAM on a real CUDA card, at real sizes (run on a lent GPU, under 6 minutes).

For each case a model with random weights is built directly on the GPU (never a 7B random init on the CPU),
4-bit cases are quantized layer by layer with bitsandbytes, a few training steps run (forward, backward, AdamW
or paged 8-bit AdamW), and torch.cuda.max_memory_reserved is compared with `hf-vram plan`'s prediction for the
same settings (its CUDA context excluded: torch does not count it). Then the longest sequence an 8B Llama QLoRA
trains at batch 1 within a 12 GiB budget (torch.cuda.set_per_process_memory_fraction) is searched, and compared
with the longest the plan predicts. Rows are appended to the output file as they come.
    python bench/gpu_vram_check.py [--out gpu_vram.md] [--dry-run]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hf_vram.recipe.schema import Recipe  # noqa: E402
from hf_vram.vram.estimate import CUDA_CONTEXT, GiB, estimate  # noqa: E402
from hf_vram.vram.gpus import get_gpu  # noqa: E402

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000)
QLORA = {"quant": {"bits": 4, "double_quant": True}, "adapter": {"type": "lora", "r": 16, "dropout": 0.0}}
CASES = [
    # (name, config, recipe sections, micro-batch, sequence)
    ("llama-1b full", LLAMA_1B, {"train": {"optimizer": "adamw_torch"}}, 2, 512),
    ("llama-1b full ckpt", LLAMA_1B, {"train": {"optimizer": "adamw_torch", "gradient_checkpointing": True}}, 4, 1024),
    ("llama-7b qlora", LLAMA_7B, {**QLORA, "train": {"optimizer": "paged_adamw_8bit"}}, 1, 512),
    ("llama-7b qlora ckpt", LLAMA_7B, {**QLORA, "train": {"optimizer": "paged_adamw_8bit", "gradient_checkpointing": True}}, 4, 512),
]


def recipe(sections: dict, micro: int, seq: int) -> Recipe:
    train = {"micro_batch_size": micro, **sections.get("train", {})}
    return Recipe.model_validate({"model": {"name_or_path": "/random"}, "data": {"source": "builtin:arithmetic", "max_length": seq},
                                  **{k: v for k, v in sections.items() if k != "train"}, "train": train})


def predicted(config, r: Recipe) -> int:
    plan = estimate(config, r, get_gpu("h100"), compute_dtype="bfloat16", fused_loss=False)
    return plan.peak - CUDA_CONTEXT  # torch's counters do not include the context


def build(config, r: Recipe):
    """The model on the GPU in bf16, its block linears quantized to NF4 one by one when the recipe says so."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if r.quant.bits else torch.float32)
    if r.quant.bits:
        import bitsandbytes as bnb
        from peft import get_peft_model, prepare_model_for_kbit_training

        from hf_vram.builders.adapter import adapter_config

        head = model.get_output_embeddings()
        for module in list(model.modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, torch.nn.Linear) and child is not head:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                          compress_statistics=r.quant.double_quant, quant_type=r.quant.type)
                    q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                                 compress_statistics=r.quant.double_quant, quant_type=r.quant.type)
                    q.weight = q.weight.cuda()  # quantizes on the GPU
                    setattr(module, child_name, q)
                    del child
        torch.cuda.empty_cache()
        model.is_loaded_in_4bit = True
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=r.train.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, adapter_config(r.adapter))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    elif r.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def run_steps(model, r: Recipe, micro: int, seq: int, vocab: int, steps: int = 3) -> int:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if r.train.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.PagedAdamW8bit(params, lr=1e-5)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        ids = torch.randint(0, vocab, (micro, seq), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_reserved()


def longest_sequence(config, budget_gib: float, out) -> None:
    """Longest sequence (multiple of 256) an 8B Llama QLoRA trains at batch 1 within the budget, measured and
    predicted."""
    import torch

    r0 = recipe({**QLORA, "train": {"optimizer": "paged_adamw_8bit", "gradient_checkpointing": True}}, 1, 256)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(budget_gib * GiB / total)
    model = build(config, r0)
    best, seq = 0, 1024
    while seq <= 16384:
        try:
            run_steps(model, r0, 1, seq, config.vocab_size, steps=1)
            best = seq
            seq *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    lo, hi = best, seq  # refine between the last fit and the first failure, in steps of 256
    while hi - lo > 256:
        mid = (lo + hi) // 512 * 256
        try:
            run_steps(model, r0, 1, mid, config.vocab_size, steps=1)
            lo = mid
        except torch.OutOfMemoryError:
            hi = mid
        finally:
            torch.cuda.empty_cache()
    budget = int(budget_gib * GiB)
    pred = max((s for s in range(256, 32769, 256) if predicted(config, r0.model_copy(update={"data": r0.data.model_copy(update={"max_length": s})})) <= budget), default=0)
    out.write(f"\nLongest sequence at batch 1 within {budget_gib} GiB (8B Llama QLoRA, checkpointing): measured {lo}, predicted {pred}\n")
    out.flush()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="gpu_vram.md")
    p.add_argument("--dry-run", action="store_true", help="print the predictions only (no GPU needed)")
    args = p.parse_args()
    from transformers import LlamaConfig

    if args.dry_run:
        for name, cfg, sections, micro, seq in CASES:
            print(f"{name:<22} predicted {predicted(LlamaConfig(**cfg), recipe(sections, micro, seq)) / GiB:6.2f} GiB")
        return 0
    import torch

    assert torch.cuda.is_available(), "no CUDA device"
    start = time.time()
    with open(args.out, "a") as out:
        out.write(f"\n{torch.cuda.get_device_name()}: predicted vs torch.cuda.max_memory_reserved\n\n"
                  "| case | micro x seq | predicted GiB | measured GiB | error |\n|---|---|---|---|---|\n")
        for name, cfg, sections, micro, seq in CASES:
            config = LlamaConfig(**cfg)
            r = recipe(sections, micro, seq)
            model = build(config, r)
            measured = run_steps(model, r, micro, seq, config.vocab_size)
            pred = predicted(config, r)
            out.write(f"| {name} | {micro} x {seq} | {pred / GiB:.2f} | {measured / GiB:.2f} | {(pred - measured) / measured:+.1%} |\n")
            out.flush()
            print(name, f"{pred / GiB:.2f} vs {measured / GiB:.2f} GiB", f"{time.time() - start:.0f} s", flush=True)
            del model
            torch.cuda.empty_cache()
        longest_sequence(LlamaConfig(**LLAMA3_8B), 12.0, out)
    print(Path(args.out).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
