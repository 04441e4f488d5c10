"""The experiment behind docs/benchmarks.md's "voice prefix" figures: `cpu-fast`'s T3 in
the fast decoder (traced step) with the prefill over the whole prompt, against the prefill
over the text only after the voice's kept keys and values (``t3_voice_prefix``):
prefill time and 101-token time, alternated three times in one process, after one
generation each (which keeps the voice's prefix). Run from the repository root; a few
minutes with the full-size random model:

    OMP_NUM_THREADS=2 python docs/experiments/t3_voice_prefix.py random
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from t3_int4_cpu import ROOT, timed_generation  # noqa: E402

from chatterbox_demo.config import PRESETS  # noqa: E402  (t3_int4_cpu puts the root on the path)
from chatterbox_demo.manager import ModelManager  # noqa: E402
from chatterbox_demo.optimizations import build_t3  # noqa: E402
from chatterbox_demo.pipeline import padded_text_tokens, t3_cond_for  # noqa: E402


def main(weights: str) -> None:
    manager = ModelManager(weights, device="cpu", cache_dir=Path(tempfile.mkdtemp()),
                           shipped_voices=ROOT / "voices")
    tts = manager.load().tts
    conds, _ = manager.library.conditionals(manager.library.get("bright-high"))
    text = padded_text_tokens(tts, tts.t3, "The old lighthouse stood at the edge of the cliff.")
    t3 = build_t3(tts.t3, PRESETS["cpu-fast"])
    inputs = {"t3_cond": t3_cond_for(conds, 0.5, "cpu"), "text_tokens": torch.cat([text, text])}

    def generate(reuse: bool, tokens: int) -> float:
        inputs["t3_cond"] = t3_cond_for(conds, 0.5, "cpu")  # fresh: T3 caches on it
        return timed_generation(t3, inputs, tokens, "traced", reuse_voice_prefix=reuse)

    for reuse in (False, True):
        generate(reuse, 8)  # warm-up: records the traced step, keeps the voice's prefix
    for run in (1, 2, 3):
        for reuse in (False, True):
            first, whole = generate(reuse, 1), generate(reuse, 101)
            label = "voice prefix kept" if reuse else "whole prompt"
            print(f"run {run} {label}: prefill + 1 token {first:.2f} s, 101 tokens "
                  f"{whole:.2f} s ({101 / whole:.1f} tokens/s)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny")
