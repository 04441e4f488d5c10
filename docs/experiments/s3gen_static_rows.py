"""Would ``cpu-compiled`` gain from CFG's rows side by side, as ``cpu-fast`` does? Its
static int8 CFM estimator is one AOTInductor package exported for the batch of two
(docs/benchmarks.md, "CFG's rows side by side"). This builds that package as the app
builds it, and a second one exported for a batch of one and compiled for one thread
(Inductor fixes a kernel's thread count when it generates it), then times one estimator
call of an upstream S3Gen pass (batch 2, cut to ``--frames``, 600 as in the benchmark)
both ways, alternated: the batch-2 package on both cores, and the batch-1 package run on
each row in its own thread (``optimizations.ParallelRows``), with one loaded copy and
with a copy per thread. Both packages calibrate on the same recorded calls (the batch-1
one on each call's two rows apart).

Not kept: the rows ran one after the other (the package's Python binding holds the
interpreter lock through a call), 0.53x, and one row on one core took 94% of the batch's
time on two, so even at once they would gain little (docs/benchmarks.md, after the
attention routes of the AVX2 EPYC).

With full-size weights it compiles twice (about 5 minutes each on a 2-core Zen 5 EPYC).
Run from the repository root; on a CPU with AVX-512, the variables below make PyTorch,
Inductor, oneDNN and MKL take their AVX2 code instead, as on the AVX2 EPYC, and
``--no-vnni`` quantizes activations to 7 bits as the app does on a CPU without VNNI:

    ATEN_CPU_CAPABILITY=avx2 FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \\
      MKL_ENABLE_INSTRUCTIONS=AVX2 OMP_NUM_THREADS=2 \\
      python docs/experiments/s3gen_static_rows.py random --no-vnni
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch._inductor import aoti_load_package  # noqa: E402

from chatterbox_demo import hardware  # noqa: E402
from chatterbox_demo.manager import ModelManager  # noqa: E402
from chatterbox_demo.optimizations import (  # noqa: E402
    FRAME_INPUTS,
    Calibration,
    ParallelRows,
    StaticInt8Estimator,
    compiled_static_int8,
    quantize_estimator_static,
)


def rows_of(call: dict) -> list[dict]:
    """A recorded batch-2 call as two batch-1 calls."""
    return [{name: value[row:row + 1] if torch.is_tensor(value) else value
             for name, value in call.items()} for row in (0, 1)]


def cut(call: dict, frames: int) -> dict:
    # Contiguous: the package reads its inputs in the layout it was exported with.
    return {name: value[..., :frames].contiguous() if name in FRAME_INPUTS else value
            for name, value in call.items()}


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


def build(flow, calibration: Calibration, threads: int, label: str, copies: int = 1):
    """The package compiled for ``threads``, loaded ``copies`` times: one loaded package
    runs one call at a time (AOTInductor's container holds one model in torch 2.6)."""
    started = time.perf_counter()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            loaded = [compiled_static_int8(flow, calibration, Path(scratch))]
            loaded += [aoti_load_package(str(next(Path(scratch).glob("*.pt2"))))
                       for _ in range(copies - 1)]
    finally:
        torch.set_num_threads(before)
    print(f"{label}: compiled in {time.perf_counter() - started:.0f} s", flush=True)
    return [StaticInt8Estimator(package) for package in loaded]


class RowCopies(torch.nn.Module):
    """Two loaded copies of one package behind ``ParallelRows``: the row worker's thread
    runs the second, the calling thread the first."""

    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    @property
    def dtype(self):
        return torch.float32

    def forward(self, **inputs):
        worker = threading.current_thread().name.startswith("cfm-row")
        return (self.second if worker else self.first)(**inputs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("weights", nargs="?", default="tiny")
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--no-vnni", action="store_true",
                        help="7-bit activations, as the app quantizes without VNNI")
    args = parser.parse_args()
    if args.no_vnni:
        hardware.int8_dot_product = lambda: False  # read by quantize_estimator_static
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '')}, "
          f"7-bit activations: {not hardware.int8_dot_product()}", flush=True)
    manager = ModelManager(args.weights, device="cpu", cache_dir=Path(tempfile.mkdtemp()),
                           shipped_voices=ROOT / "voices")
    manager.load()
    calibration = manager._estimator_calibration()
    calls = calibration.record()
    flow = manager.loaded.tts.s3gen.flow
    fp32 = flow.decoder.estimator
    quantized = quantize_estimator_static(fp32, calls)
    [whole] = build(flow, Calibration(calibration.source, lambda: calls),
                    torch.get_num_threads(), "batch-2 package")
    # Another source names another package (the key covers it), though the scratch
    # directories already keep the two apart.
    rows_source = {**calibration.source, "rows": torch.ones(1)}
    copies = build(flow, Calibration(rows_source,
                                     lambda: [row for call in calls for row in rows_of(call)]),
                   1, "batch-1 package, one thread", copies=2)
    one_copy, side_by_side = ParallelRows(copies[0]), ParallelRows(RowCopies(*copies))
    call = cut({name: value for name, value in calls[len(calls) // 2].items()
                if value is not None}, args.frames)
    print(f"call: batch {call['x'].shape[0]}, {call['x'].shape[-1]} frames", flush=True)
    with torch.no_grad():
        reference = fp32(**call)
        print(f"quantized graph, uncompiled: relative error against fp32 "
              f"{relative_error(quantized(**call), reference):.4f}", flush=True)
        runs = {"batch-2 package, 2 threads": lambda: whole(**call),
                "batch-1 package, a row per thread, one copy": lambda: one_copy(**call),
                "batch-1 package, a row per thread, a copy each": lambda: side_by_side(**call)}
        for label, run in runs.items():
            print(f"{label}: relative error against fp32 "
                  f"{relative_error(run(), reference):.4f}", flush=True)
        times = {label: [] for label in runs}
        for _ in range(args.rounds):
            for label, run in runs.items():
                started = time.perf_counter()
                run()
                times[label].append(time.perf_counter() - started)
    first = None
    for label, values in times.items():
        median = statistics.median(values)
        first = first or median
        print(f"{label}: median {median * 1e3:.1f} ms (min {min(values) * 1e3:.1f}), "
              f"{first / median:.2f}x", flush=True)


if __name__ == "__main__":
    main()
