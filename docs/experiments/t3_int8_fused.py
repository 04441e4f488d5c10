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
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from t3_int4_cpu import compare  # noqa: E402
from torch import nn  # noqa: E402

from chatterbox_demo import optimizations  # noqa: E402


def per_tensor_int8(t3):
    """int8 dynamic as `t3-int8` built it before: torch.ao's default, one scale per tensor."""
    from torch.ao.quantization import quantize_dynamic

    t3 = copy.deepcopy(optimizations.without_patched_model(t3))
    t3.tfmr = quantize_dynamic(t3.tfmr, {nn.Linear}, dtype=torch.qint8)
    return t3.eval()


def per_channel_int8(t3, fuse: bool):
    t3 = copy.deepcopy(optimizations.without_patched_model(t3))
    return optimizations.apply_t3_int8_dynamic(t3, join=fuse).eval()


def main(weights: str) -> None:
    compare(weights, lambda t3: {"int8 per tensor, 7 calls": per_tensor_int8(t3),
                                 "int8 per channel, 7 calls": per_channel_int8(t3, fuse=False),
                                 "int8 per channel, 4 calls": per_channel_int8(t3, fuse=True)})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny")
