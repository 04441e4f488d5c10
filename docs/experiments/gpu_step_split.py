"""Where one speech token's time goes in the fast decoder on a GPU, run by
docs/experiments/gpu_check.sh after the benchmark: decode tokens/s for T3 in fp32 and bf16
with the eager step (``plain``) and the CUDA-graph step, then, for bf16 CUDA graphs, the
time of the graph replay alone and of the on-device sampling alone, per token. If the two
parts add up to about the whole, the next gain is in whichever is larger; if not, the host
(Python between launches) is the gap. Run from the repository root:

    python docs/experiments/gpu_step_split.py random cuda

On a CPU (``tiny cpu``) it runs the eager steps and the ``bucketed`` step in place of the
graph, which is how the script itself is checked without a GPU.
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
from chatterbox_demo.fast_t3 import FastT3Decoder, sample_token  # noqa: E402
from chatterbox_demo.manager import ModelManager  # noqa: E402
from chatterbox_demo.optimizations import build_t3  # noqa: E402
from chatterbox_demo.pipeline import padded_text_tokens, sync, t3_cond_for  # noqa: E402

TOKENS = 200


def seconds(device, work, repeats: int = 1) -> float:
    """Wall time of ``work()`` run ``repeats`` times, the device drained before and after."""
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        work()
    sync(device)
    return time.perf_counter() - started


def main(weights: str, device: str) -> None:
    manager = ModelManager(weights, device=device, cache_dir=Path(tempfile.mkdtemp()),
                           shipped_voices=ROOT / "voices")
    tts = manager.load().tts
    conds, _ = manager.library.conditionals(manager.library.get("calm-mid"))
    text_tokens = padded_text_tokens(tts, tts.t3, "The old lighthouse stood at the cliff.")
    graph_mode = "cuda-graph" if device == "cuda" else "bucketed"
    variants = {"fp32": build_t3(tts.t3, PRESETS["fast-decoder"]),
                "bf16": build_t3(tts.t3, PRESETS["gpu-fast"])}

    def generation(t3, mode: str, tokens: int) -> float:
        decoder = FastT3Decoder(t3, step_mode=mode)
        inputs = {"t3_cond": t3_cond_for(conds, 0.5, device, decoder.dtype),
                  "text_tokens": torch.cat([text_tokens, text_tokens])}
        return seconds(device, lambda: decoder.generate(
            **inputs, max_new_tokens=tokens, stop_on_eos=False, allow_stop=False))

    for name, t3 in variants.items():
        for mode in ("plain", graph_mode):
            generation(t3, mode, TOKENS)  # warm-up: kernels, and every bucket's graph
            first = generation(t3, mode, 1)
            whole = generation(t3, mode, TOKENS + 1)
            print(f"T3 {name}, {mode} step: prefill + 1 token {first * 1e3:.1f} ms, decode "
                  f"{TOKENS / (whole - first):.1f} tokens/s", flush=True)

    # The parts of one bf16 graph step, each timed alone over TOKENS calls.
    t3 = variants["bf16"]
    decoder = FastT3Decoder(t3, step_mode=graph_mode)
    with torch.inference_mode():
        cache, step = decoder._cache_and_step(2, 512)
        embed = torch.randn(2, 1, t3.cfg.hidden_size, dtype=decoder.dtype, device=device)
        positions = [100 + i % 200 for i in range(TOKENS)]  # every bucket from 64 to 320
        for position in positions:
            step(embed, position)  # warm-up: captures
        replay = seconds(device, lambda: [step(embed, p) for p in positions])
        logits = torch.randn(2, t3.hp.speech_tokens_dict_size, device=device)
        seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=device)
        cfg = torch.tensor(0.5, device=device)
        draw = seconds(device, lambda: sample_token(logits, seen, cfg, 0.8, 1.2, 0.05, 1.0),
                       TOKENS)
    print(f"bf16 {graph_mode} step alone: {replay / TOKENS * 1e3:.2f} ms/token; sampling "
          f"alone: {draw / TOKENS * 1e3:.2f} ms/token", flush=True)


if __name__ == "__main__":
    main(*(sys.argv[1:3] if len(sys.argv) > 2 else ("tiny", "cpu")))
