"""The experiment behind docs/benchmarks.md's "voice prefix" figures: `cpu-fast`'s T3 in
the fast decoder (traced step) with the prefill over the whole prompt, against the prefill
over the text only after the voice's kept keys and values (``t3_voice_prefix``):
prefill time and 101-token time, alternated three times in one process, after one
generation each (which keeps the voice's prefix). Run from the repository root; a few
minutes with the full-size random model:

    OMP_NUM_THREADS=2 python docs/experiments/t3_voice_prefix.py random
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from chatterbox_demo.config import PRESETS  # noqa: E402
from chatterbox_demo.fast_t3 import FastT3Decoder  # noqa: E402
from chatterbox_demo.manager import ModelManager  # noqa: E402
from chatterbox_demo.optimizations import build_t3  # noqa: E402
from chatterbox_demo.pipeline import padded_text_tokens, t3_cond_for  # noqa: E402


def main(weights: str) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    manager = ModelManager(weights, device="cpu", cache_dir=Path(tempfile.mkdtemp()),
                           shipped_voices=ROOT / "voices")
    tts = manager.load().tts
    conds, _ = manager.library.conditionals(manager.library.get("bright-high"))
    text = padded_text_tokens(tts, tts.t3, "The old lighthouse stood at the edge of the cliff.")
    t3 = build_t3(tts.t3, PRESETS["cpu-fast"])

    def generate(reuse: bool, tokens: int) -> float:
        torch.manual_seed(0)
        started = time.perf_counter()
        FastT3Decoder(t3, step_mode="traced", reuse_voice_prefix=reuse).generate(
            t3_cond=t3_cond_for(conds, 0.5, "cpu"), text_tokens=torch.cat([text, text]),
            max_new_tokens=tokens, stop_on_eos=False)
        return time.perf_counter() - started

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
