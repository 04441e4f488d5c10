"""The experiment behind docs/benchmarks.md's figures for ``t3_onednn``: the fast
decoder's traced step with T3's float Linear layers on PyTorch's default fp32 matmul (MKL)
against oneDNN with packed weights, for T3 in fp32 (`fast-decoder` against `t3-onednn`)
and in int8, where only the speech head is float (`t3-int8` against `t3-int8` with
``t3_onednn``): logits agreement with fp32, prefill time and decode tokens/s, alternated
twice in one process. Run from the repository root; a few minutes with the full-size
random model:

    OMP_NUM_THREADS=2 python docs/experiments/t3_onednn.py random
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from t3_int4_cpu import compare  # noqa: E402

from chatterbox_demo.config import PRESETS  # noqa: E402  (t3_int4_cpu puts the root on the path)
from chatterbox_demo.optimizations import build_t3  # noqa: E402


def main(weights: str) -> None:
    int8_onednn = dataclasses.replace(PRESETS["t3-int8"], t3_onednn=True)
    compare(weights, lambda t3: {"fast-decoder": build_t3(t3, PRESETS["fast-decoder"]),
                                 "t3-onednn": build_t3(t3, PRESETS["t3-onednn"]),
                                 "t3-int8": build_t3(t3, PRESETS["t3-int8"]),
                                 "t3-int8, oneDNN head": build_t3(t3, int8_onednn)},
            step_modes=("traced",))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny")
