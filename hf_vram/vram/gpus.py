"""The cards hf-vram plans for: memory and dense bf16 tensor throughput (no sparsity), with sources."""

from __future__ import annotations

from dataclasses import dataclass

from hf_vram.errors import UserError, did_you_mean


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # total device memory as the driver reports it
    bf16_tflops: float  # dense bf16 tensor-core peak, TFLOP/s
    memory_gbps: float = 500.0  # peak device-memory bandwidth, GB/s: what a token of sampling (decoding) is bound by


GPUS = {
    # Consumer cards run bf16 tensor math with fp32 accumulate (what training uses) at half their fp16-accumulate
    # rate; those halved, dense figures are used.
    # GeForce RTX 3060 12 GB: NVIDIA Ampere GA102 whitepaper (appendix, GeForce RTX 30 series), 51 TFLOPS fp16
    # tensor dense with fp16 accumulate -> 25.6 with fp32 accumulate.
    "rtx3060": GPU("RTX 3060 12 GB", 12.0, 25.6, 360.0),  # 192-bit GDDR6 at 15 Gbps: 360 GB/s
    # GeForce RTX 4070 12 GB: NVIDIA Ada Lovelace specifications (AD104), 116.6 TFLOPS fp16 tensor dense with fp16
    # accumulate -> 58.3 with fp32 accumulate.
    "rtx4070": GPU("RTX 4070 12 GB", 12.0, 58.3, 504.2),  # 192-bit GDDR6X at 21 Gbps: 504.2 GB/s
    # GeForce RTX 4090 24 GB: NVIDIA Ada Lovelace whitepaper (AD102), 165.2 TFLOPS fp16/bf16 tensor dense with fp32
    # accumulate.
    "rtx4090": GPU("RTX 4090 24 GB", 24.0, 165.2, 1008.0),  # 384-bit GDDR6X at 21 Gbps: 1,008 GB/s
    # A100 40 GB / 80 GB (SXM): NVIDIA A100 datasheet, 312 TFLOPS BF16 tensor, dense.
    "a100-40gb": GPU("A100 40 GB", 40.0, 312.0, 1555.0),  # datasheet: 1,555 GB/s HBM2
    "a100-80gb": GPU("A100 80 GB", 80.0, 312.0, 2039.0),  # datasheet: 2,039 GB/s HBM2e
    # H100 80 GB SXM: NVIDIA H100 datasheet, 989 TFLOPS BF16 tensor, dense (1,979 with sparsity).
    "h100": GPU("H100 80 GB", 80.0, 989.0, 3350.0),  # datasheet: 3.35 TB/s HBM3
}
DEFAULT_GPU = "rtx4070"


def get_gpu(name: str) -> GPU:
    key = name.lower().replace(" ", "").replace("_", "-")
    if key not in GPUS:
        raise UserError(f"--gpu {name}: unknown card{did_you_mean(key, GPUS)}; known: {', '.join(GPUS)}")
    return GPUS[key]
