"""Routes to a faster S3Gen or T3 on a CPU without an int8 dot product (the AVX2 EPYC),
each against what the presets ran before, medians (docs/benchmarks.md, "CFG's rows side
by side, and routes not taken"). Parts 1-3 and 5 were not kept, so that nobody tries
them again blind; part 4 became the switch ``cfm_parallel_rows``:

1. The CFM estimator's convolutions (kernel 3, 256 or 512 input channels, 256 output,
   2 x 508 frames): PyTorch's fp32 convolution (oneDNN) against the same convolution as
   an int8 dynamic Linear over its unfolded input (im2col), the int8 route that gives
   the estimator's Linear layers 1.6x.
2. ``torch._int_mm`` (int8 x int8 -> int32), the building block an int8 attention would
   need, against an fp32 matmul: at a large square shape and at the attention's shape
   (16 heads' scores, 508 x 64 by 64 x 508).
3. T3's decode-step Linear layers (2 rows): int8 weights through PyTorch's own
   weight-only kernel (``_weight_int8pack_mm``, fp32 or bf16 activations) against the
   int8 dynamic layers ``cpu-fast`` uses; 30 weights taken in turn, so that they come
   from memory, in GB/s of int8 weights read.
4. With full-size weights: one call of ``cpu-fast``'s int8 CFM estimator from an
   upstream S3Gen pass (batch 2: CFG's two rows) as upstream makes it, against the same
   call through ``optimizations.ParallelRows`` (a row per thread, each thread on half of
   the cores), alternated.
5. The estimator's attention (2 rows x 8 heads x 508 frames, head size 64): PyTorch's fp32
   SDPA against the same attention with its two matmuls in int8 through fbgemm's dynamic
   int8 Linear (each head's keys, or values, quantized and packed as the Linear's weight
   per call, 7-bit activations as on a CPU without VNNI), and with the scores alone in int8.

Run from the repository root; parts 1-3 and 5 take about a minute, part 4 three more:

    OMP_NUM_THREADS=2 python docs/experiments/cpu_routes.py random

On a CPU with AVX-512, these variables make PyTorch, fbgemm, oneDNN and MKL take their
AVX2 kernels instead, an emulation of the AVX2 EPYC's instructions (not of its caches or
clocks):

    ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
      MKL_ENABLE_INSTRUCTIONS=AVX2 OMP_NUM_THREADS=2 python docs/experiments/cpu_routes.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from cpu_matmul_kernels import COPIES, DECODE_ROWS, median_seconds  # noqa: E402
from torch import nn  # noqa: E402
from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from chatterbox_demo.config import PRESETS  # noqa: E402
from chatterbox_demo.manager import ModelManager  # noqa: E402
from chatterbox_demo.optimizations import (  # noqa: E402
    ParallelRows,
    build_s3gen,
    record_estimator_calls,
)

BATCH, FRAMES, KERNEL = 2, 508, 3


def int8_linear(linear: nn.Linear) -> nn.Module:
    return quantize_dynamic(nn.Sequential(linear), {nn.Linear: per_channel_dynamic_qconfig},
                            dtype=torch.qint8)[0]


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


def convolutions() -> None:
    print(f"CFM estimator convolutions, kernel {KERNEL}, {BATCH} x {FRAMES} frames, ms:")
    for inputs in (256, 512):
        convolution(inputs)


def convolution(inputs: int) -> None:
    conv = nn.Conv1d(inputs, 256, KERNEL)
    linear = nn.Linear(inputs * KERNEL, 256)
    with torch.no_grad():  # the linear's input is (frame, tap, channel) flattened
        linear.weight.copy_(conv.weight.permute(0, 2, 1).reshape(256, -1))
        linear.bias.copy_(conv.bias)
    quantized = int8_linear(linear)
    x = torch.randn(BATCH, inputs, FRAMES)

    def fp32_conv():
        return conv(F.pad(x, (KERNEL - 1, 0)))  # causal, as upstream's CausalConv1d

    def int8_im2col():
        columns = F.pad(x, (KERNEL - 1, 0)).transpose(1, 2).unfold(1, KERNEL, 1)
        columns = columns.transpose(2, 3).reshape(BATCH * FRAMES, -1)
        return quantized(columns).view(BATCH, FRAMES, -1).transpose(1, 2)

    error = relative_error(int8_im2col(), fp32_conv())
    print(f"  {inputs} -> 256: fp32 convolution {median_seconds(fp32_conv) * 1e3:.2f}, "
          f"im2col + int8 dynamic Linear {median_seconds(int8_im2col) * 1e3:.2f} "
          f"(relative error {error:.3f})")


def int_mm() -> None:
    print("torch._int_mm against fp32 matmul, GFLOP/s:")
    a, b = (torch.randint(-100, 100, (1024, 1024), dtype=torch.int8) for _ in range(2))
    rates = [2 * 1024**3 / median_seconds(run, calls=3) / 1e9
             for run in (lambda: torch._int_mm(a, b), lambda: a.float() @ b.float())]
    print(f"  1024 x 1024 x 1024: int8 {rates[0]:.1f}, fp32 {rates[1]:.0f} "
          "(fp32 including both casts)")
    q = torch.randint(-100, 100, (16, FRAMES, 64), dtype=torch.int8)
    k = torch.randint(-100, 100, (16, 64, FRAMES), dtype=torch.int8)
    qf, kf = q.float(), k.float()
    seconds = [median_seconds(run, calls=3) for run in
               (lambda: [torch._int_mm(q[i], k[i]) for i in range(16)],
                lambda: torch.bmm(qf, kf))]
    print(f"  attention scores, 16 x {FRAMES} x 64 x {FRAMES}: int8 {seconds[0] * 1e3:.1f} ms, "
          f"fp32 {seconds[1] * 1e3:.1f} ms")


def decode_linears() -> None:
    print(f"T3 decode step Linear layers, {DECODE_ROWS} rows, {COPIES} weights in turn, "
          "GB/s of int8 weights read:")
    for name, inputs, outputs in (("q/k/v joined", 1024, 3072), ("gate/up joined", 1024, 8192),
                                  ("down", 4096, 1024)):
        decode_linear(name, inputs, outputs)


def decode_linear(name: str, inputs: int, outputs: int) -> None:
    linears = [nn.Linear(inputs, outputs, bias=False) for _ in range(COPIES)]
    dynamic = [int8_linear(linear) for linear in linears]
    scales = [linear.weight.detach().abs().amax(1) / 127 for linear in linears]
    packed = [(torch.round(linear.weight.detach() / scale[:, None]).to(torch.int8), scale)
              for linear, scale in zip(linears, scales, strict=True)]
    x = torch.randn(DECODE_ROWS, inputs)
    runs = {
        "int8 dynamic (cpu-fast)": lambda: [layer(x) for layer in dynamic],
        "_weight_int8pack_mm, bf16 activations": lambda: [
            torch._weight_int8pack_mm(x.bfloat16(), w, s.bfloat16()) for w, s in packed],
        "_weight_int8pack_mm, fp32 activations": lambda: [
            torch._weight_int8pack_mm(x, w, s) for w, s in packed],
    }
    weight_bytes = COPIES * inputs * outputs
    print(f"  {name} {inputs}->{outputs}: " + ", ".join(
        f"{kernel} {weight_bytes / median_seconds(run, calls=5) / 1e9:.1f}"
        for kernel, run in runs.items()))


def int8_attention() -> None:
    heads = BATCH * 8  # SDPA takes them as (row, head): a 3-d input runs a slower path
    q, k, v = (torch.randn(BATCH, 8, FRAMES, 64) for _ in range(3))
    q = q * 64 ** -0.5  # the softmax scale, folded into the queries
    q1, k1, v1 = (x.view(heads, FRAMES, 64) for x in (q, k, v))

    def packed(weight: torch.Tensor):
        scale = weight.abs().amax().item() / 127
        return torch.ops.quantized.linear_prepack(
            torch.quantize_per_tensor(weight, scale, 0, torch.qint8), None)

    def int8_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ weight.T with both in int8 (reduce_range: 7-bit activations)."""
        return torch.ops.quantized.linear_dynamic(x, packed(weight), True)

    runs = {
        "fp32 SDPA (cpu-fast)": lambda: F.scaled_dot_product_attention(q, k, v, scale=1.0),
        "both matmuls int8": lambda: torch.stack([
            int8_matmul(int8_matmul(q1[i], k1[i]).softmax(-1), v1[i].t().contiguous())
            for i in range(heads)]).view_as(q),
        "scores int8, values fp32": lambda: torch.stack([
            int8_matmul(q1[i], k1[i]).softmax(-1) @ v1[i] for i in range(heads)]).view_as(q),
    }
    reference = runs["fp32 SDPA (cpu-fast)"]()
    print(f"CFM estimator attention, {heads} heads x {FRAMES} frames x 64, ms "
          f"(PyTorch's CPU capability {torch.backends.cpu.get_cpu_capability()}):")
    print("  " + ", ".join(
        f"{name} {median_seconds(run, calls=15) * 1e3:.2f} "
        f"(relative error {relative_error(run(), reference):.3f})"
        for name, run in runs.items()))


def estimator_rows(weights: str, rounds: int = 6) -> None:
    manager = ModelManager(weights, device="cpu", cache_dir=Path(tempfile.mkdtemp()),
                           shipped_voices=ROOT / "voices")
    tts = manager.load().tts
    conds, _ = manager.library.conditionals(manager.library.get(manager.library.names()[0]))
    s3gen = build_s3gen(tts.s3gen, PRESETS["cpu-fast"])
    tokens = torch.randint(0, 6561, (100,), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    calls = record_estimator_calls(
        s3gen, lambda: s3gen.inference(speech_tokens=tokens, ref_dict=conds.gen))
    estimator = s3gen.flow.decoder.estimator
    call = {name: value for name, value in calls[3].items() if value is not None}
    parallel = ParallelRows(estimator)
    runs = {"both rows on every core (upstream)": lambda: estimator(**call),
            "a row per thread (ParallelRows)": lambda: parallel(**call)}
    times = {name: [] for name in runs}
    with torch.inference_mode():
        error = relative_error(parallel(**call), estimator(**call))
        for _ in range(rounds):
            for name, run in runs.items():
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
    frames = call["x"].shape[-1]
    print(f"One cpu-fast CFM estimator call ({frames} frames), {rounds} rounds, ms "
          f"(relative difference {error:.1e}):")
    for name, seconds in times.items():
        print(f"  {name}: median {statistics.median(seconds) * 1e3:.0f} "
              f"({', '.join(f'{s * 1e3:.0f}' for s in seconds)})")


def main(weights: str | None) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    torch.manual_seed(0)
    with torch.inference_mode():
        convolutions()
        int_mm()
        decode_linears()
        int8_attention()
    if weights:
        estimator_rows(weights)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
