"""The profile behind docs/benchmarks.md's account of what is left of an int8 decode step
on the CPU: `t3-int8`'s T3 (joined int8 projections) in the fast decoder, batch 2 for CFG,
a 300-position prompt in the cache, then 20 single-token steps (no sampling) under
``torch.profiler``; prints the wall time per step and the operators by self time. Run from
the repository root; about two minutes with the full-size random model:

    OMP_NUM_THREADS=2 python docs/experiments/t3_int8_step_profile.py random
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
from torch.profiler import profile  # noqa: E402

from chatterbox_demo.config import PRESETS  # noqa: E402
from chatterbox_demo.fast_t3 import FastT3Decoder, StaticKVCache  # noqa: E402
from chatterbox_demo.manager import ModelManager  # noqa: E402
from chatterbox_demo.optimizations import build_t3  # noqa: E402

PROMPT, STEPS = 300, 20


def main(weights: str) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    manager = ModelManager(weights, device="cpu", cache_dir=Path(tempfile.mkdtemp()),
                           shipped_voices=ROOT / "voices")
    t3 = build_t3(manager.load().tts.t3, PRESETS["t3-int8"])
    decoder = FastT3Decoder(t3)
    attn = t3.tfmr.layers[0].self_attn
    cache = StaticKVCache(len(t3.tfmr.layers), 2, t3.cfg.num_attention_heads,
                          PROMPT + 3 * STEPS + 8, attn.head_dim, torch.float32, "cpu")
    generator = torch.Generator().manual_seed(0)
    token = torch.randn(2, 1, t3.cfg.hidden_size, generator=generator)
    with torch.inference_mode():
        decoder.forward(torch.randn(2, PROMPT, t3.cfg.hidden_size, generator=generator),
                        cache, 0)
        for position in range(PROMPT, PROMPT + 5):  # warm-up
            decoder.forward(token, cache, position)
        started = time.perf_counter()
        for position in range(PROMPT + 5, PROMPT + 5 + STEPS):
            decoder.forward(token, cache, position)
        print(f"{(time.perf_counter() - started) / STEPS * 1000:.1f} ms per step, wall",
              flush=True)
        with profile() as prof:
            for position in range(PROMPT + 5 + STEPS, PROMPT + 5 + 2 * STEPS):
                decoder.forward(token, cache, position)
    print(f"{STEPS} steps profiled; divide counts and times by {STEPS} for one step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny")
