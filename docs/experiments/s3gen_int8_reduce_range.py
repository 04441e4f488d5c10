"""The experiment behind docs/benchmarks.md's account of int8-static on CPUs without an
int8 dot product: the CFM estimator quantized with the x86 Inductor quantizer's 8-bit
activations (``reduce_range=False``, what int8-static used before) and 7-bit ones
(``reduce_range=True``), each compiled ahead of time as int8-static compiles it; for
each, the SNR against the fp32 estimator over the ten calls of one upstream S3Gen pass
(the first voice's own prompt tokens), of the quantized graph run exactly (quantize,
dequantize, fp32) and of the compiled int8 kernels. Run from the repository root; about
three minutes with the tiny model, most of it compiling:

    OMP_NUM_THREADS=2 python docs/experiments/s3gen_int8_reduce_range.py tiny
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.ao.quantization.quantizer.x86_inductor_quantizer as xiq  # noqa: E402
from torch._inductor import aoti_compile_and_package, aoti_load_package  # noqa: E402
from torch.export import export  # noqa: E402

from chatterbox_demo import fidelity, hardware, optimizations  # noqa: E402
from chatterbox_demo.manager import ModelManager  # noqa: E402


def main(weights: str) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    print(f"int8 dot product (VNNI, AMX-INT8): {hardware.int8_dot_product()}")
    manager = ModelManager(weights, device="cpu", cache_dir=Path(tempfile.mkdtemp()),
                           shipped_voices=ROOT / "voices")
    tts = manager.load().tts
    conds, _ = manager.library.conditionals(manager.library.get(manager.library.names()[0]))
    estimator = tts.s3gen.flow.decoder.estimator
    calls = optimizations.record_estimator_calls(
        tts.s3gen, lambda: fidelity.mel(tts.s3gen, conds, conds.gen["prompt_token"][0], 10,
                                        cfg=True))
    calls = [{name: value for name, value in call.items() if value is not None}
             for call in calls]
    with torch.no_grad():
        fp32 = [estimator(**call) for call in calls]
    default_config = xiq.get_default_x86_inductor_quantization_config
    for reduce_range in (False, True):
        # quantize_estimator_static asks for the config (with its own reduce_range, which
        # this swallows); hand it this experiment's choice instead.
        xiq.get_default_x86_inductor_quantization_config = \
            lambda choice=reduce_range, **_: default_config(reduce_range=choice)
        quantized = optimizations.quantize_estimator_static(estimator, calls)
        with torch.no_grad(), tempfile.TemporaryDirectory() as scratch:
            program = export(quantized, args=(), kwargs=calls[0],
                             dynamic_shapes=optimizations._frames_dynamic(calls[0]))
            package = aoti_compile_and_package(program, package_path=f"{scratch}/e.pt2",
                                               inductor_configs={"freezing": True})
            compiled = aoti_load_package(package)
            pairs = list(zip(fp32, calls, strict=True))
            exact = [fidelity.snr_db(ref, quantized(**call)) for ref, call in pairs]
            kernels = [fidelity.snr_db(ref, compiled(**call)) for ref, call in pairs]
        print(f"reduce_range={reduce_range}: SNR against fp32, quantized graph run exactly "
              f"{min(exact):.1f}-{max(exact):.1f} dB, int8 kernels "
              f"{min(kernels):.1f}-{max(kernels):.1f} dB", flush=True)
    xiq.get_default_x86_inductor_quantization_config = default_config


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny")
