#!/usr/bin/env bash
# GPU check for a lent CUDA machine (the CPU suite cannot reach these paths): the demo's QLoRA in bf16 with
# bitsandbytes' CUDA kernels and paged 8-bit AdamW, the peak memory it records, the throughput bench, and the
# fine-tuning tests on CUDA, where recipes compute in bf16 and trl keeps the adapters in bf16 (the recipe
# family's tiny variants, DPO, ChatML tokens, every adapter kind, merge), GPT-2 124M's MFU, the VRAM check, and
# every diffusion recipe at its real size.
#   bash bench/gpu_check.sh        (about 5 minutes; needs the .venv of `make install` with a CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/hf-vram-gpu}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
$PY -m hf_vram train demo-base train.output_dir="$OUT/demo-base" train.report_to=[]
$PY -m hf_vram train demo model.name_or_path="$OUT/demo-base" train.output_dir="$OUT/demo" train.report_to=[]
$PY - "$OUT" <<'PY'
import json, sys
for name in ("demo-base", "demo"):
    s = json.load(open(f"{sys.argv[1]}/{name}/train_summary.json"))
    print(name, "final loss", round(s["final_loss"], 4), "peak allocated MiB", s["cuda_max_allocated_bytes"] // 2**20)
    assert s["cuda_max_allocated_bytes"] > 0
PY
$PY bench/bench_train.py --steps 60
$PY bench/gpu_gpt2_mfu.py --out "$OUT/gpt2_mfu.md"    # GPT-2 124M tokens/s and MFU, hf-vram vs a plain loop, under 3 minutes
$PY -m pytest -q -x tests/test_recipe_family.py tests/test_adapters.py tests/test_merge.py
$PY bench/gpu_vram_check.py --out "$OUT/gpu_vram.md"   # predicted vs measured VRAM at real sizes, under 6 minutes
$PY bench/gpu_diffusion_check.py --out "$OUT/gpu_diffusion.md"   # every diffusion recipe at its real size: predicted vs measured peak
