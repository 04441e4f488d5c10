"""The experiment behind docs/benchmarks.md's "traced decode step" figures: the fast
decoder's single-token step run eagerly (``plain``, what it did before) against the same
step recorded once with ``torch.jit.trace`` and replayed (``traced``, what it does on a
CPU now), for T3 in fp32 (`fast-decoder`) and with int8 dynamic layers (`t3-int8`,
`cpu-fast`): prefill time and decode tokens/s, alternated twice in one process. Both modes
draw the same tokens (tests/test_fast_t3.py). Run from the repository root; a few minutes
with the full-size random model:

    OMP_NUM_THREADS=2 python docs/experiments/t3_traced_step.py random
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from t3_int4_cpu import compare  # noqa: E402

from chatterbox_demo.config import PRESETS  # noqa: E402  (t3_int4_cpu puts the root on the path)
from chatterbox_demo.optimizations import build_t3  # noqa: E402


def main(weights: str) -> None:
    compare(weights, lambda t3: {preset: build_t3(t3, PRESETS[preset])
                                 for preset in ("fast-decoder", "t3-int8")},
            step_modes=("plain", "traced"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny")
