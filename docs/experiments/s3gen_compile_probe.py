"""What torch.compile makes of S3Gen's two hot parts, full size, random weights, CPU.

    python docs/experiments/s3gen_compile_probe.py estimator [int8-|ao-int8-]MODE
    python docs/experiments/s3gen_compile_probe.py hift MODE

MODE: eager, compiled, or (estimator) compiled-unsynced, or (hift) compiled-plain-ints.

estimator: one CFM estimator forward at batch 2 over 600 mel frames (CFG's two halves,
400 prompt + 200 output frames: 100 speech tokens), timed six times after the first
(compiling) call. ``compiled-unsynced`` first rebinds upstream's mask helper
(``optimizations.use_mask_without_sync``), as ``build_s3gen`` does for compiled variants;
``int8-`` first quantizes its Linear layers as ``s3gen-int8`` and ``cpu-fast`` do
(``torch.ao`` dynamic), ``ao-int8-`` with torchao's int8 dynamic activations and int8
weights, the scheme torchao lowers to Inductor's fused int8 GEMMs when compiled.
hift: HiFT's inference over 200, 300, 250, 300 and 250 mel frames (a new length recompiles
where shapes are not dynamic). ``compiled-plain-ints`` first makes its convolutions'
settings Python ints (``optimizations.plain_int_conv_settings``). Both print the graph
breaks Dynamo counted (set TORCH_LOGS=graph_breaks,recompiles for the reasons).
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from chatterbox.models.s3gen import S3Gen  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from chatterbox_demo.optimizations import (  # noqa: E402
    _plain_linears,
    apply_s3gen_int8_dynamic,
    plain_int_conv_settings,
    use_mask_without_sync,
)


def estimator(mode: str) -> None:
    s3gen = S3Gen()
    if mode.startswith("int8-"):
        apply_s3gen_int8_dynamic(s3gen)
    if mode.startswith("ao-int8-"):
        import torchao.quantization as tq

        _plain_linears(s3gen.flow.decoder.estimator)
        tq.quantize_(s3gen.flow.decoder.estimator, tq.Int8DynamicActivationInt8WeightConfig())
    est = s3gen.flow.decoder.estimator.eval()
    frames = 600
    inputs = dict(x=torch.randn(2, 80, frames), mask=torch.ones(2, 1, frames),
                  mu=torch.randn(2, 80, frames), t=torch.rand(2), spks=torch.randn(2, 80),
                  cond=torch.randn(2, 80, frames))
    if mode.endswith("compiled-unsynced"):
        use_mask_without_sync(est)
    forward = est.forward if mode.endswith("eager") else torch.compile(est.forward, dynamic=True)
    with torch.inference_mode():
        started = time.perf_counter()
        forward(**inputs)
        print(f"{mode}: first call {time.perf_counter() - started:.1f} s", flush=True)
        times = []
        for _ in range(6):
            started = time.perf_counter()
            forward(**inputs)
            times.append(time.perf_counter() - started)
    print(f"{mode}: forward s {[round(t, 3) for t in times]}, median "
          f"{sorted(times)[3]:.3f}")


def hift(mode: str) -> None:
    vocoder = S3Gen().mel2wav.eval()
    if mode == "compiled-plain-ints":
        plain_int_conv_settings(vocoder)
    if mode != "eager":
        vocoder.decode = torch.compile(vocoder.decode, dynamic=True)
    with torch.inference_mode():
        for frames in (200, 300, 250, 300, 250):
            mel = torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(1))
            started = time.perf_counter()
            vocoder.inference(speech_feat=mel)
            print(f"{mode}: {frames} frames {time.perf_counter() - started:.2f} s", flush=True)


if __name__ == "__main__":
    part, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    {"estimator": estimator, "hift": hift}[part](mode)
    print(f"{mode}: torch {torch.__version__}, graph breaks "
          f"{sum(counters['graph_break'].values())}, graphs {counters['stats']['unique_graphs']}")
