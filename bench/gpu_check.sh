#!/usr/bin/env bash
# GPU check for a lent CUDA machine, one command under 8 minutes (../shared/device/README.md): QLoRA of an 8B Llama-3
# with random weights in NF4 at 4k-32k tokens under a 12 GiB cap, each memory saving on and off, against the plan;
# the longest sequence that trains; tokens/s of hf-vram against plain trl SFTTrainer defaults
# (bench/gpu_longctx_check.py, under 4.5 minutes); then GPT-2 124M's MFU (bench/gpu_gpt2_mfu.py, under 3 minutes).
# Tables go to $OUT (gpu_longctx.md, gpt2_mfu.md, versions.txt), each written as its rows come. The other GPU
# checks (bench/gpu_vram_check.py, bench/gpu_diffusion_check.py) do not fit in the same 8 minutes: each is a command
# of its own.
#
#   on the development machine, at the project root: bash ../shared/device/wheels.sh   (.whl/: bitsandbytes, trl,
#     datasets, peft, pydantic, ... and liger-kernel, a pure-Python wheel of 0.9 MB whose Triton kernels the image's
#     triton compiles: the all-savings-on rows use its RMSNorm, RoPE and SwiGLU)
#   on the GPU machine, carrying .whl:  . .whl/install.sh && bash bench/gpu_check.sh
#   anywhere, no GPU:                   bash bench/gpu_check.sh --dry-run   (the same scripts on the CPU, tiny)
# PY picks the interpreter (default python3, the image's); LONGCTX_S and GPT2_S bound each script's seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/hf-vram-gpu}
LONGCTX_S=${LONGCTX_S:-270}
GPT2_S=${GPT2_S:-160}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
# What ran, for the notes: the image's versions are not pinned by the project.
$PY -m pip list --format=freeze 2>/dev/null \
  | grep -iE '^(torch|transformers|pyarrow|fsspec|peft|accelerate|huggingface|trl|bitsandbytes|liger|datasets)' \
  | tee "$OUT/versions.txt" || true

if [[ "${1:-}" == "--dry-run" ]]; then
  $PY bench/gpu_longctx_check.py --dry-run --out "$OUT/gpu_longctx.md"
  $PY bench/gpu_gpt2_mfu.py --dry-run --out "$OUT/gpt2_mfu.md"
  exit 0
fi

$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
status=0
# Each script is bounded on its own, so that one that runs long still leaves the other its turn; the budget given
# to the long-context check is below its bound by the time its last case may overrun.
timeout "$LONGCTX_S" $PY bench/gpu_longctx_check.py --budget-s $((LONGCTX_S - 40)) --out "$OUT/gpu_longctx.md" \
  || { status=$?; echo "gpu_longctx_check.py exited $status"; }
timeout "$GPT2_S" $PY bench/gpu_gpt2_mfu.py --steps 30 --warmup 10 --out "$OUT/gpt2_mfu.md" \
  || { status=$?; echo "gpu_gpt2_mfu.py exited $status"; }
echo
cat "$OUT/gpu_longctx.md" "$OUT/gpt2_mfu.md" 2>/dev/null || true
exit $status
