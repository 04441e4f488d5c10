"""Probes of S3Gen on a CPU that were not kept as switches, so that nobody tries them again
blind (docs/benchmarks.md, "Tried on S3Gen and not kept"). Full-size random weights,
alternated in one process, medians:

1. One attention block of the CFM estimator (batch 2, 510 frames: a 6.2 s prompt plus 100
   tokens; 256 channels, 8 heads of 64) with the all-zero mask bias the estimator passes
   (it masks nothing for one utterance): diffusers' processor as upstream runs it; the
   same with the mask left out (same output bit for bit); and q/k/v from one joined Linear
   (diffusers' ``fuse_projections``) with the mask left out.
2. The attention itself: PyTorch's SDPA against the same math traced by TorchScript with
   oneDNN Graph fusion (``torch.jit.enable_onednn_fusion``), frozen.
3. HiFT's ``decode()`` over 200 mel frames: eager against traced, frozen and
   ``optimize_for_inference`` (oneDNN weight prepacking).

Run from the repository root:

    OMP_NUM_THREADS=2 python docs/experiments/s3gen_cpu_probes.py
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers.models.attention_processor import (  # noqa: E402
    Attention,
    AttnProcessor2_0,
    FusedAttnProcessor2_0,
)

from chatterbox_demo.weights import build_modules  # noqa: E402


def without_empty_mask(processor_class):
    class Processor(processor_class):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None,
                     attention_mask=None, *args, **kwargs):
            if attention_mask is not None and not attention_mask.any():
                attention_mask = None
            return super().__call__(attn, hidden_states, encoder_hidden_states,
                                    attention_mask, *args, **kwargs)
    return Processor()


def alternated(calls: dict, rounds: int, per_round: int) -> dict:
    times = {name: [] for name in calls}
    for call in calls.values():  # warm-up
        call()
    for _ in range(rounds):
        for name, call in calls.items():
            started = time.perf_counter()
            for _ in range(per_round):
                call()
            times[name].append((time.perf_counter() - started) / per_round)
    return {name: statistics.median(seconds) for name, seconds in times.items()}


def report(title: str, outputs: dict, medians: dict) -> None:
    reference = next(iter(outputs.values()))
    print(title)
    for name, seconds in medians.items():
        error = (outputs[name] - reference).abs().max().item()
        print(f"  {name}: {seconds * 1000:.2f} ms (max |difference| {error:.3g})")


def attention_block() -> None:
    torch.manual_seed(0)
    stock = Attention(query_dim=256, heads=8, dim_head=64).eval()
    no_mask = copy.deepcopy(stock)
    no_mask.set_processor(without_empty_mask(AttnProcessor2_0))
    joined = copy.deepcopy(stock)
    joined.fuse_projections()
    joined.set_processor(without_empty_mask(FusedAttnProcessor2_0))
    hidden = torch.randn(2, 510, 256)
    bias = (1.0 - torch.ones(2, 1, 510)) * -1.0e10  # upstream's mask_to_bias of "keep all"
    blocks = {"stock": stock, "mask left out": no_mask, "joined q/k/v, mask left out": joined}
    calls = {name: (lambda b=b: b(hidden, attention_mask=bias)) for name, b in blocks.items()}
    with torch.inference_mode():
        outputs = {name: call() for name, call in calls.items()}
        report("attention block:", outputs, alternated(calls, rounds=20, per_round=5))


class MathAttention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.matmul(torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / 8.0, -1), v)


def onednn_attention() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 510, 64) for _ in range(3))
    torch.jit.enable_onednn_fusion(True)
    try:
        with torch.no_grad():
            fused = torch.jit.freeze(torch.jit.trace(MathAttention().eval(), (q, k, v)))
            for _ in range(3):  # the profiling executor fuses after a few calls
                fused(q, k, v)
            calls = {"SDPA": lambda: F.scaled_dot_product_attention(q, k, v),
                     "oneDNN Graph fused": lambda: fused(q, k, v)}
            outputs = {name: call() for name, call in calls.items()}
            report("attention:", outputs, alternated(calls, rounds=5, per_round=10))
    finally:
        torch.jit.enable_onednn_fusion(False)


class HiftDecode(torch.nn.Module):
    def __init__(self, hift):
        super().__init__()
        self.hift = hift

    def forward(self, mel, source):
        return self.hift.decode(x=mel, s=source)


def hift_decode() -> None:
    _, s3gen, _ = build_modules("full", seed=0)
    hift = s3gen.mel2wav.eval()
    mel = torch.randn(1, 80, 200, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f0 = hift.f0_predictor(mel)
        source, _, _ = hift.m_source(hift.f0_upsamp(f0[:, None]).transpose(1, 2))
        source = source.transpose(1, 2)
        traced = torch.jit.trace(HiftDecode(copy.deepcopy(hift)).eval(), (mel, source),
                                 check_trace=False)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
        calls = {"eager": lambda: hift.decode(x=mel, s=source),
                 "frozen, prepacked": lambda: frozen(mel, source)}
        outputs = {name: call() for name, call in calls.items()}
        report("HiFT decode:", outputs, alternated(calls, rounds=6, per_round=1))


if __name__ == "__main__":
    attention_block()
    onednn_attention()
    hift_decode()
