"""The one-off probe behind docs/benchmarks.md's figures on one T3 decode step on the CPU
(the "T3 int4 weight-only" paragraph): the Linear layers of one token alone, int8 dynamic
against int4 (bf16 and fp32 activations); then one whole decode step of the fast decoder
(batch 2 for CFG, a 300-token prompt in the cache, no sampling) eager, compiled per layer
as the fast decoder compiles it, and compiled as one whole step. Run from the repository
root; about ten minutes with the full-size random T3 on 2 cores:

    OMP_NUM_THREADS=2 python docs/experiments/t3_decode_step.py
"""

from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from chatterbox.models.t3 import T3  # noqa: E402
from t3_int4_cpu import Int4Linear  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import profile  # noqa: E402

from chatterbox_demo import optimizations  # noqa: E402
from chatterbox_demo.fast_t3 import FastT3Decoder  # noqa: E402

PROMPT = 300


def timed(fn, repeats: int) -> float:
    """Seconds per call, after two untimed calls."""
    for _ in range(2):
        fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def int4_copy(t3):
    t3 = copy.deepcopy(t3)
    for parent in list(t3.tfmr.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int4Linear(child, 128))
    return t3


def linear_layers(t3) -> list[nn.Module]:
    return [m for m in t3.tfmr.modules()
            if isinstance(m, (nn.Linear, Int4Linear)) or type(m).__name__ == "Linear"]


def in_features(layer) -> int:
    # An int4 layer packs two weights per byte along its inputs.
    return layer.packed.shape[1] * 2 if isinstance(layer, Int4Linear) else layer.in_features


def step_time(t3, compiled: str, repeats: int = 20) -> tuple[float, float]:
    """(seconds for the first step, seconds per later step) of the fast decoder."""
    decoder = FastT3Decoder(t3)
    cache = decoder._new_cache(2, PROMPT + 64)
    embed = torch.randn(2, 1, 1024)
    step = lambda position: decoder.forward(embed, cache, position)  # noqa: E731
    if compiled == "whole":
        step = torch.compile(step, dynamic=True)
    decoder.forward(torch.randn(2, PROMPT, 1024), cache, 0)  # the prompt, eagerly
    started = time.perf_counter()
    step(PROMPT)
    first = time.perf_counter() - started
    positions = iter(range(PROMPT + 1, PROMPT + 64))
    return first, timed(lambda: step(next(positions)), repeats)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    torch.manual_seed(0)
    pristine = optimizations.without_patched_model(T3().eval())
    int8 = optimizations.apply_t3_int8_dynamic(copy.deepcopy(pristine))
    int4 = int4_copy(pristine)

    with torch.inference_mode():
        print("Linear layers of one token (batch 2), ms:")
        for label, t3, fp32_kernel in (("int8 dynamic", int8, False),
                                       ("int4, bf16 activations", int4, False),
                                       ("int4, fp32 activations", int4, True)):
            layers = linear_layers(t3)
            inputs = {n: torch.randn(2, n) for n in (1024, 4096)}

            def run(layers=layers, inputs=inputs, fp32_kernel=fp32_kernel):
                for layer in layers:
                    x = inputs[in_features(layer)]
                    if fp32_kernel:  # the kernel's fp32-activation path, called directly
                        torch.ops.aten._weight_int4pack_mm_for_cpu(
                            x, layer.packed, layer.group_size,
                            layer.scales_and_zeros.float())
                    else:
                        layer(x)
            repeats = 2 if fp32_kernel else 10
            print(f"  {label} ({len(layers)} layers): {timed(run, repeats) * 1e3:.1f}")

        print(f"One decode step (batch 2, {PROMPT}-token prompt), ms:")
        for label, t3 in (("int8 dynamic", int8), ("int4", int4)):
            _, per_step = step_time(t3, "off")
            print(f"  {label}, eager: {per_step * 1e3:.1f}")
        for label, t3 in (("int4", int4), ("int8 dynamic", int8)):
            per_layer = copy.copy(t3)
            per_layer.compile_mode = "default"  # what the fast decoder compiles: one layer
            first, per_step = step_time(per_layer, "off")
            print(f"  {label}, compiled per layer: {per_step * 1e3:.1f} "
                  f"(first step {first:.0f} s)")
            if label == "int4":
                decoder = FastT3Decoder(per_layer)
                cache = decoder._new_cache(2, PROMPT + 64)
                embed = torch.randn(2, 1, 1024)
                with profile() as prof:
                    for position in range(PROMPT, PROMPT + 5):
                        decoder.forward(embed, cache, position)
                for event in prof.key_averages():
                    if event.key.startswith(("Torch-Compiled Region", "TorchDynamo Cache")):
                        print(f"    {event.key}: {event.self_cpu_time_total / 5e3:.1f} ms "
                              "per step (self)")
        for label, t3 in (("int4", int4), ("int8 dynamic", int8)):
            first, per_step = step_time(t3, "whole", repeats=5)
            print(f"  {label}, compiled as one step: {per_step * 1e3:.1f} "
                  f"(first step {first:.0f} s)")


if __name__ == "__main__":
    main()
