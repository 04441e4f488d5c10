"""The experiment behind docs/benchmarks.md's "int8 projections joined" figures: T3's int8
dynamic layers as they were (one scale per weight tensor, 7 matmul calls per layer) against
one scale per output channel (the same 7 calls), and per channel with the query/key/value
and gate/up projections joined (4 calls per layer, what `t3-int8` builds for the fast
decoder now), all in the fast decoder: teacher-forced logits against fp32, prefill time and
decode tokens/s, alternated twice in one process. Run from the repository root; a few
minutes with the full-size random model:

    OMP_NUM_THREADS=2 python docs/experiments/t3_int8_fused.py random
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from t3_int4_cpu import timed_generation  # noqa: E402
from torch import nn  # noqa: E402

from chatterbox_demo import fidelity, optimizations  # noqa: E402
from chatterbox_demo.manager import ModelManager  # noqa: E402
from chatterbox_demo.pipeline import padded_text_tokens, t3_cond_for  # noqa: E402


def per_tensor_int8(t3):
    """int8 dynamic as `t3-int8` built it before: torch.ao's default, one scale per tensor."""
    from torch.ao.quantization import quantize_dynamic

    t3 = copy.deepcopy(optimizations.without_patched_model(t3))
    t3.tfmr = quantize_dynamic(t3.tfmr, {nn.Linear}, dtype=torch.qint8)
    return t3.eval()


def per_channel_int8(t3, fuse: bool):
    t3 = copy.deepcopy(optimizations.without_patched_model(t3))
    return optimizations.apply_t3_int8_dynamic(t3, fuse=fuse).eval()


def main(weights: str) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    manager = ModelManager(weights, device="cpu", cache_dir=Path(tempfile.mkdtemp()),
                           shipped_voices=ROOT / "voices")
    tts = manager.load().tts
    conds, _ = manager.library.conditionals(manager.library.get("calm-mid"))
    text = "The old lighthouse stood at the edge of the cliff."
    text_tokens = padded_text_tokens(tts, tts.t3, text)
    inputs = {"t3_cond": t3_cond_for(conds, 0.5, "cpu"),
              "text_tokens": torch.cat([text_tokens, text_tokens])}
    speech_tokens = torch.randint(0, 6561, (100,), generator=torch.Generator().manual_seed(0))
    reference = fidelity.teacher_forced_logits(tts.t3, conds, text_tokens, speech_tokens)

    variants = {"int8 per tensor, 7 calls": per_tensor_int8(tts.t3),
                "int8 per channel, 7 calls": per_channel_int8(tts.t3, fuse=False),
                "int8 per channel, 4 calls": per_channel_int8(tts.t3, fuse=True)}
    for name, t3 in variants.items():
        cosine, top1 = fidelity.compare_logits(
            reference, fidelity.teacher_forced_logits(t3, conds, text_tokens, speech_tokens))
        print(f"{name}: logits cosine {cosine:.4f}, top-1 {top1:.2f}", flush=True)
        timed_generation(t3, inputs, 8)  # warm-up
    for run in (1, 2):  # alternated, so drifts in the machine's speed hit every variant
        for name, t3 in variants.items():
            first = timed_generation(t3, inputs, 1)
            whole = timed_generation(t3, inputs, 101)
            print(f"run {run} {name}: prefill + 1 token {first:.2f} s, 101 tokens "
                  f"{whole:.2f} s, decode {100 / (whole - first):.1f} tokens/s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny")
