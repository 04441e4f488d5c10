"""Where one speech token's time goes in the fast decoder on a GPU, all with T3 in bf16
(`gpu-fast`). Part of docs/experiments/gpu_check.sh in the two H100 runs of 2026-11-26
(docs/benchmarks.md), left out of it since to leave time for compiling `gpu-compiled`:

- decode tokens/s with the eager step (``plain``), with cuDNN's attention left out of
  SDPA's choice (what the app does on CUDA) and allowed (PyTorch's default);
- decode tokens/s with the CUDA-graph step, eager and compiled (``torch.compile``,
  default mode, captured in the graphs), and how far the compiled step's logits are from
  the eager one's on the same cache;
- the graph replay alone, and the on-device sampling alone, per token. If they add up to
  about the whole, the next gain is in the larger; if not, the host is the gap.

With a third argument ``joined`` it measures instead what joining each layer's q/k/v and
gate/up projections (``optimizations.join_projections``: 4 matmuls a layer instead of 7)
does to the CUDA-graph step, eager and compiled: decode tokens/s and the replay alone,
separate against joined (the gpu_check.sh run of 2026-11-27).

Run from the repository root (on an H100 it ended inside the 150 s it was given, most of
it loading the model and compiling):

    python docs/experiments/gpu_step_split.py random cuda
    python docs/experiments/gpu_step_split.py random cuda joined

On a CPU (``tiny cpu``) the ``bucketed`` step runs in place of the graph, which is how
the script itself is checked without a GPU.
"""

from __future__ import annotations

import dataclasses
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
from chatterbox_demo.fast_t3 import FastT3Decoder, bucket_for, sample_token  # noqa: E402
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


def main(weights: str, device: str, what: str = "split") -> None:
    manager = ModelManager(weights, device=device, cache_dir=Path(tempfile.mkdtemp()),
                           shipped_voices=ROOT / "voices")
    tts = manager.load().tts  # applies the device's preset, and so its torch settings
    conds, _ = manager.library.conditionals(manager.library.get("calm-mid"))
    text_tokens = padded_text_tokens(tts, tts.t3, "The old lighthouse stood at the cliff.")
    graph_mode = "cuda-graph" if device == "cuda" else "bucketed"
    gpu_fast = PRESETS["gpu-fast"]
    # The stock decoder's variants keep the projections separate (the fast decoder's join
    # them): the script drives FastT3Decoder itself, so it can time both. Without `joined`
    # it times the separate step, as runs 1 and 2 did.
    separate = dataclasses.replace(gpu_fast, t3_decoder="stock", cuda_graphs=False)
    eager = build_t3(tts.t3, separate)
    compiled = build_t3(tts.t3, dataclasses.replace(separate, compile_mode="default"))

    def decode_rate(label: str, t3, mode: str, tokens: int = TOKENS) -> None:
        decoder = FastT3Decoder(t3, step_mode=mode)
        inputs = {"t3_cond": t3_cond_for(conds, 0.5, device, decoder.dtype),
                  "text_tokens": torch.cat([text_tokens, text_tokens]),
                  "stop_on_eos": False, "allow_stop": False}

        def generation(n: int) -> float:
            return seconds(device, lambda: decoder.generate(**inputs, max_new_tokens=n))

        generation(tokens)  # warm-up: kernels, compiling, every bucket's graph
        first, whole = generation(1), generation(tokens + 1)
        print(f"T3 bf16, {label}: prefill + 1 token {first * 1e3:.1f} ms, decode "
              f"{tokens / (whole - first):.1f} tokens/s", flush=True)

    @torch.inference_mode()
    def replay_alone(label: str, t3) -> None:
        """The graph step alone over cache positions 100-299 (buckets 128 to 320)."""
        embed = torch.randn(2, 1, t3.cfg.hidden_size, dtype=t3.speech_emb.weight.dtype,
                            device=device)
        positions = [100 + i % 200 for i in range(TOKENS)]
        _, step = FastT3Decoder(t3, step_mode=graph_mode)._cache_and_step(2, 512)
        for position in positions:
            step(embed, position)  # warm-up: captures
        replay = seconds(device, lambda: [step(embed, p) for p in positions])
        print(f"bf16 {graph_mode} step alone, {label}: {replay / TOKENS * 1e3:.2f} "
              "ms/token", flush=True)

    if what == "joined":
        variants = {
            "eager, separate projections": eager,
            "eager, joined projections": build_t3(tts.t3, gpu_fast),
            "compiled, separate projections": compiled,
            "compiled, joined projections": build_t3(
                tts.t3, dataclasses.replace(gpu_fast, compile_mode="default")),
        }
        for label, t3 in variants.items():
            # Each variant compiles afresh, as in a process that builds only it: the layer
            # step is one compiled function for every variant, and without the reset the
            # second layout would find the first's versions already there. (When this ran
            # in run 4, before compiling.compile_hot raised Dynamo's limit of 8 versions
            # per function, the reset also kept the step from running eagerly past it.)
            torch._dynamo.reset()
            decode_rate(f"{graph_mode} step, {label}", t3, graph_mode)
            replay_alone(label, t3)
        return

    decode_rate("plain step", eager, "plain")
    if device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(True)
        decode_rate("plain step, cuDNN attention allowed", eager, "plain", TOKENS // 2)
        torch.backends.cuda.enable_cudnn_sdp(False)
    decode_rate(f"{graph_mode} step", eager, graph_mode)
    decode_rate(f"{graph_mode} step, compiled", compiled, graph_mode)

    with torch.inference_mode():
        # The compiled step against the eager one on the same (random) cache.
        decoder = FastT3Decoder(eager)
        cache = decoder._new_cache(2, 512)
        cache.k.normal_()
        cache.v.normal_()
        embed = torch.randn(2, 1, eager.cfg.hidden_size, dtype=decoder.dtype, device=device)
        pos = torch.tensor([150], device=device)
        want = decoder.forward_at(embed, cache.k, cache.v, pos, bucket_for(150, 512))
        got = FastT3Decoder(compiled).forward_at(embed, cache.k, cache.v, pos,
                                                 bucket_for(150, 512))
        error = ((got - want).norm() / want.norm()).item()
        print(f"compiled step's logits against eager (bf16): relative error {error:.2e}")

        for label, t3 in (("eager", eager), ("compiled", compiled)):
            replay_alone(label, t3)
        logits = torch.randn(2, eager.hp.speech_tokens_dict_size, device=device)
        seen = torch.zeros(1, logits.shape[-1], dtype=torch.bool, device=device)
        cfg = torch.tensor(0.5, device=device)
        draw = seconds(device, lambda: sample_token(logits, seen, cfg, 0.8, 1.2, 0.05, 1.0),
                       TOKENS)
    print(f"sampling alone: {draw / TOKENS * 1e3:.2f} ms/token", flush=True)


if __name__ == "__main__":
    main(*(sys.argv[1:] if len(sys.argv) > 2 else ("tiny", "cpu")))
