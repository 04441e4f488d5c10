"""The probe behind docs/benchmarks.md's figures on attention in one T3 decode step on the
CPU: SDPA for one new token over the KV cache of each of T3's 30 layers (batch 2 for CFG,
16 heads of 64), with the cache in fp32 (what the fast decoder keeps), bf16 and fp16, at
330 and 700 cached positions. Each layer reads its own cache, as a real step does, so the
figures include fetching it from memory. Run from the repository root; under a minute:

    OMP_NUM_THREADS=2 python docs/experiments/kv_cache_attention.py
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

BATCH, HEADS, HEAD_DIM, LAYERS, MAX_LEN = 2, 16, 64, 30, 1024


def step(query, keys, values, length: int) -> None:
    """Attention of one new token in every layer over the first ``length`` positions."""
    for k, v in zip(keys, values, strict=True):
        F.scaled_dot_product_attention(query.to(k.dtype), k[:, :, :length],
                                       v[:, :, :length]).float()


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    torch.manual_seed(0)
    query = torch.randn(BATCH, HEADS, 1, HEAD_DIM)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        shape = (BATCH, HEADS, MAX_LEN, HEAD_DIM)
        keys = [torch.randn(shape).to(dtype) for _ in range(LAYERS)]
        values = [torch.randn(shape).to(dtype) for _ in range(LAYERS)]
        for length in (330, 700):
            with torch.inference_mode():
                for _ in range(3):
                    step(query, keys, values, length)
                started = time.perf_counter()
                for _ in range(20):
                    step(query, keys, values, length)
            seconds = (time.perf_counter() - started) / 20
            cache_mb = 2 * LAYERS * BATCH * HEADS * length * HEAD_DIM * dtype.itemsize / 1e6
            print(f"{str(dtype).removeprefix('torch.')} cache, {length} positions: "
                  f"{seconds * 1000:.1f} ms per step for {cache_mb:.0f} MB of keys and values "
                  f"({cache_mb / 1000 / seconds:.1f} GB/s)", flush=True)


if __name__ == "__main__":
    main()
