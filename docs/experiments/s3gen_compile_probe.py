"""What torch.compile makes of S3Gen's two hot parts, full size, random weights, CPU.

    python docs/experiments/s3gen_compile_probe.py estimator [int8-|ao-int8-|autotuned-]MODE
    python docs/experiments/s3gen_compile_probe.py estimator [frozen-|pt2e-int8-]COMPILED
    python docs/experiments/s3gen_compile_probe.py hift MODE

MODE: eager, compiled, or (estimator) compiled-unsynced, or (hift) compiled-plain-ints.
COMPILED: compiled-static (static shapes: one compile per frame count), compiled-marked
(the frame dimension of the inputs marked dynamic, the weights static) or compiled
(``dynamic=True``); all three with upstream's mask helper rebound.

estimator: one CFM estimator forward at batch 2 over 600 mel frames (CFG's two halves,
400 prompt + 200 output frames: 100 speech tokens), timed six times after the first
(compiling) call. ``compiled-unsynced`` first rebinds upstream's mask helper
(``optimizations.use_mask_without_sync``), as ``build_s3gen`` does for compiled variants;
``frozen-`` compiles with Inductor's freezing (weights folded in as constants and
prepacked for oneDNN); ``pt2e-int8-`` quantizes statically first, the issue's PT2E flow:
export with a dynamic frame dimension, the x86 Inductor quantizer's default config,
calibration on six random inputs, ``convert_pt2e``, then compiled with freezing (the
tutorial's setting: without it the int8 Linear layers are not lowered to oneDNN's int8
kernels). Those modes take turns in one process (five each) with the fp32 eager forward
and the ``torch.ao`` int8 dynamic one (``cpu-fast``'s without bf16) at 600 frames and,
where shapes are not static, at 400, 510 and 450 frames too.
``autotuned-`` compiles in mode max-autotune-no-cudagraphs (Inductor's autotuning, no
CUDA graphs: the mode a CPU can take) instead of the default one.
``int8-`` first quantizes its Linear layers as ``s3gen-int8`` and ``cpu-fast`` do
(``torch.ao`` dynamic), ``ao-int8-`` with torchao's int8 dynamic activations and int8
weights, the scheme torchao lowers to Inductor's fused int8 GEMMs when compiled.
hift: HiFT's inference over 200, 300, 250, 300 and 250 mel frames (a new length recompiles
where shapes are not dynamic). ``compiled-plain-ints`` first makes its convolutions'
settings Python ints (``optimizations.plain_int_conv_settings``). Both print the graph
breaks Dynamo counted (set TORCH_LOGS=graph_breaks,recompiles for the reasons).
"""
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from chatterbox.models.s3gen import S3Gen  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from chatterbox_demo.optimizations import (  # noqa: E402
    FRAME_INPUTS,
    _plain_linears,
    apply_s3gen_int8_dynamic,
    plain_int_conv_settings,
    quantize_estimator_static,
    use_mask_without_sync,
)


def estimator_inputs(frames: int, seed: int = 0) -> dict:
    """CFG's two halves over ``frames`` mel frames (400 prompt + 200 output: 100 tokens)."""
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(2, 80, frames, generator=g), mask=torch.ones(2, 1, frames),
                mu=torch.randn(2, 80, frames, generator=g), t=torch.rand(2, generator=g),
                spks=torch.randn(2, 80, generator=g),
                cond=torch.randn(2, 80, frames, generator=g))


def pt2e_int8(est: torch.nn.Module) -> torch.nn.Module:
    """The estimator statically quantized by the PT2E flow (not yet compiled), as the
    ``int8-static`` switch does it, calibrated on six random inputs."""
    started = time.perf_counter()
    quantized = quantize_estimator_static(est, [estimator_inputs(600, seed)
                                                for seed in range(2, 8)])
    print(f"export and calibration {time.perf_counter() - started:.1f} s", flush=True)
    return quantized


def estimator(mode: str) -> None:
    s3gen = S3Gen()
    if mode.startswith("int8-"):
        apply_s3gen_int8_dynamic(s3gen)
    if mode.startswith("ao-int8-"):
        import torchao.quantization as tq

        _plain_linears(s3gen.flow.decoder.estimator)
        tq.quantize_(s3gen.flow.decoder.estimator, tq.Int8DynamicActivationInt8WeightConfig())
    est = s3gen.flow.decoder.estimator.eval()
    inputs = estimator_inputs(600)
    with torch.no_grad():
        reference = est.forward(**inputs)
    # What the new modes take turns with: the fp32 eager forward (baseline's) and the
    # torch.ao int8 dynamic one eager (cpu-fast's, on a CPU without bf16).
    int8_dynamic = apply_s3gen_int8_dynamic(copy.deepcopy(s3gen)).flow.decoder.estimator
    rivals = {"fp32 eager": copy.deepcopy(est).forward, "int8-dynamic eager": int8_dynamic}
    if mode.endswith("compiled-unsynced") or mode.startswith(("frozen-", "pt2e-")):
        use_mask_without_sync(est)
    if mode.startswith("pt2e-int8-"):
        est = pt2e_int8(est)
    marked = mode.endswith("compiled-marked")
    new_modes = mode.startswith(("frozen-", "pt2e-"))
    if new_modes:
        # The global setting, as the tutorial has it. A first version of this probe
        # compiled est.forward with options={"freezing": True} instead: the int8
        # estimator then ran slower than fp32 eager (2.16 s against 1.65 s).
        torch._inductor.config.freezing = True
    if mode.endswith("eager"):
        forward = est.forward
    else:
        static = mode.endswith(("compiled-static", "compiled-marked"))
        options = ({"mode": "max-autotune-no-cudagraphs"} if mode.startswith("autotuned-")
                   else {})
        compiled = torch.compile(est if new_modes else est.forward, dynamic=not static,
                                 **options)

        def forward(**kwargs):
            if marked:  # only the frame dimension varies between calls
                for name in FRAME_INPUTS:
                    torch._dynamo.mark_dynamic(kwargs[name], 2)
            return compiled(**kwargs)
    # Freezing folds only what no_grad leaves as plain parameters; the earlier modes were
    # measured under inference_mode and keep it.
    with torch.no_grad() if new_modes else torch.inference_mode():
        started = time.perf_counter()
        out = forward(**inputs)
        print(f"{mode}: first call {time.perf_counter() - started:.1f} s", flush=True)
        noise = (out - reference).pow(2).sum() / reference.pow(2).sum()
        print(f"{mode}: output SNR against the fp32 eager forward "
              f"{-10 * torch.log10(noise).item():.1f} dB")
        if not new_modes:
            times = []
            for _ in range(6):
                started = time.perf_counter()
                forward(**inputs)
                times.append(time.perf_counter() - started)
            print(f"{mode}: forward s {[round(t, 3) for t in times]}, median "
                  f"{sorted(times)[3]:.3f}", flush=True)
            return
        # This machine's speed drifts by a fifth within minutes: the new modes take turns
        # with the fp32 eager forward in one process, and give both medians.
        for frames in (600,) if mode.endswith("static") else (600, 400, 510, 450):
            other = estimator_inputs(frames, seed=9)
            forward(**other)  # a new length may compile again: not timed
            contenders = {**rivals, mode: forward}
            times = {name: [] for name in contenders}
            for _ in range(5):
                for name, fn in contenders.items():
                    started = time.perf_counter()
                    fn(**other)
                    times[name].append(time.perf_counter() - started)
            medians = {name: sorted(t)[2] for name, t in times.items()}
            print(f"{mode}: {frames} frames, medians of 5 taken in turns: "
                  + ", ".join(f"{name} {m:.3f} s" for name, m in medians.items())
                  + f"; {mode} is {medians['fp32 eager'] / medians[mode]:.2f}x fp32 eager, "
                  f"{medians['int8-dynamic eager'] / medians[mode]:.2f}x int8-dynamic eager",
                  flush=True)


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
