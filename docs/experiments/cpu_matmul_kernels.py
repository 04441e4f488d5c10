"""The probe behind docs/benchmarks.md's account of matmul kernels on the AVX2 EPYC: the
shapes Chatterbox runs, timed with PyTorch's default fp32 Linear (MKL on x86 builds)
against oneDNN's with the weight packed once (``OneDNNLinear``, the ``t3_onednn`` switch)
and against int8 dynamic quantization (torch.ao, what ``cpu-fast`` uses):

- S3Gen's CFM estimator: 1016 rows (a batch of 2 for CFG times 508 frames, 100 speech
  tokens after a 154-token prompt), compute-bound, in GFLOP/s; and its attention (SDPA
  over 2 x 8 heads x 508 frames) against the two batched matmuls and softmax it is made of;
- a T3 decode step: 2 rows (CFG), bandwidth-bound, in GB/s of weights read. Thirty
  weights per shape are taken in turn, so that they come from memory rather than the
  32 MB L3 cache, as a step's 30 layers do.

Medians of many calls. Run from the repository root; about a minute:

    OMP_NUM_THREADS=2 python docs/experiments/cpu_matmul_kernels.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.ao.quantization import quantize_dynamic  # noqa: E402

from chatterbox_demo.optimizations import OneDNNLinear  # noqa: E402

ESTIMATOR_ROWS, DECODE_ROWS, COPIES = 1016, 2, 30


def median_seconds(run, calls: int = 30) -> float:
    for _ in range(3):
        run()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def kernels(linear: nn.Linear) -> dict:
    return {"MKL": linear, "oneDNN packed": OneDNNLinear(linear),
            "int8 dynamic": quantize_dynamic(nn.Sequential(linear), {nn.Linear},
                                             dtype=torch.qint8)}


def estimator_linears() -> None:
    print(f"CFM estimator Linear layers, {ESTIMATOR_ROWS} rows, GFLOP/s:")
    for inputs, outputs in ((256, 512), (256, 1024), (1024, 256), (512, 256)):
        x = torch.randn(ESTIMATOR_ROWS, inputs)
        flops = 2 * ESTIMATOR_ROWS * inputs * outputs
        rates = {name: flops / median_seconds(lambda k=kernel, x=x: k(x)) / 1e9
                 for name, kernel in kernels(nn.Linear(inputs, outputs)).items()}
        print(f"  {inputs}->{outputs}: " + ", ".join(f"{n} {r:.0f}" for n, r in rates.items()))


def estimator_attention() -> None:
    batch, heads, frames, dim = 2, 8, 508, 64
    q, k, v = (torch.randn(batch * heads, frames, dim) for _ in range(3))
    k_t = k.transpose(1, 2).contiguous()
    scores = torch.bmm(q, k_t)
    flops = 4 * batch * heads * frames * frames * dim
    parts = {
        "SDPA": lambda: F.scaled_dot_product_attention(
            *(t.view(batch, heads, frames, dim) for t in (q, k, v))),
        "q @ k^T alone": lambda: torch.bmm(q, k_t),
        "softmax alone": lambda: torch.softmax(scores, -1),
        "p @ v alone": lambda: torch.bmm(scores, v),
    }
    print(f"CFM estimator attention, {batch} x {heads} heads x {frames} frames "
          f"({flops / 1e9:.2f} GFLOP):")
    for name, run in parts.items():
        seconds = median_seconds(run)
        rate = f" ({flops / seconds / 1e9:.0f} GFLOP/s)" if name == "SDPA" else ""
        print(f"  {name}: {seconds * 1e3:.2f} ms{rate}")


def decode_linears() -> None:
    print(f"T3 decode step Linear layers, {DECODE_ROWS} rows, {COPIES} weights in turn, "
          "GB/s of fp32 weights read:")
    for name, inputs, outputs in (("speech head", 1024, 8194), ("q/k/v joined", 1024, 3072),
                                  ("gate/up joined", 1024, 8192), ("down", 4096, 1024),
                                  ("o", 1024, 1024)):
        x = torch.randn(DECODE_ROWS, 1, inputs)
        linears = [nn.Linear(inputs, outputs, bias=False) for _ in range(COPIES)]
        packed = [OneDNNLinear(linear) for linear in linears]
        weight_bytes = COPIES * inputs * outputs * 4
        rates = {}
        for kernel, layers in (("MKL", linears), ("oneDNN packed", packed)):
            seconds = median_seconds(lambda ls=layers, x=x: [layer(x) for layer in ls],
                                     calls=15)
            rates[kernel] = weight_bytes / seconds / 1e9
        print(f"  {name} {inputs}->{outputs}: "
              + ", ".join(f"{k} {r:.1f}" for k, r in rates.items()))


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    torch.manual_seed(0)
    with torch.inference_mode():
        estimator_linears()
        estimator_attention()
        decode_linears()


if __name__ == "__main__":
    main()
