"""Where the int8-static CFM estimator's first call (its compile) spends its time, and
what a second process saves through Inductor's on-disk cache. Full size, random weights.

    TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-probe OMP_NUM_THREADS=2 \
        python docs/experiments/s3gen_static_compile_time.py   # run twice

Builds the estimator as ``s3gen_quant="int8-static"`` does (``apply_s3gen_int8_static``,
calibrated here on two random calls), then times its first call at 600 frames and prints
TorchDynamo's per-phase compile times. Run it twice with the same fresh cache directory:
the first run compiles cold, the second reads what the first left there.

Kept as it was run for docs/benchmarks.md (2026-11-26), when int8-static compiled with
``torch.compile`` on the estimator's first call. Since a4cfc9a ``apply_s3gen_int8_static``
compiles ahead of time (AOTInductor) and keeps the package, so its first line includes the
compile and the "first call" is an ordinary call; ``s3gen_int8_reduce_range.py`` and the
benchmark's warm-up column time the compile now. Since then too it takes a
``Calibration`` (the calls to record, and the tensors naming the package) instead of the
calls; only that call below changed.
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from chatterbox.models.s3gen import S3Gen  # noqa: E402
from s3gen_compile_probe import estimator_inputs  # noqa: E402
from torch._dynamo.utils import compile_times  # noqa: E402

from chatterbox_demo.optimizations import Calibration, apply_s3gen_int8_static  # noqa: E402

PHASES = ("_compile.compile_inner", "create_aot_dispatcher_function", "compile_fx_inner",
          "GraphLowering.codegen", "async_compile.wait", "PyCodeCache.load_by_key_path")

torch.manual_seed(0)
s3gen = S3Gen().eval()
calls = [estimator_inputs(frames, seed) for seed, frames in enumerate((600, 500))]
started = time.perf_counter()
with torch.no_grad():
    apply_s3gen_int8_static(s3gen, Calibration(source={}, record=lambda: calls))
print(f"export, calibration, convert: {time.perf_counter() - started:.1f} s")
started = time.perf_counter()
with torch.no_grad():
    s3gen.flow.decoder.estimator(**estimator_inputs(600))
print(f"first call (compile): {time.perf_counter() - started:.1f} s")
times = dict(line.split(", ") for line in compile_times(repr="str", aggregate=True)
             .splitlines()[2:] if ", " in line)
for phase in PHASES:
    print(f"  {phase}: {float(times.get(phase, 0.0)):.1f} s")
