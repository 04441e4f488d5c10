"""The one-off experiment behind docs/benchmarks.md's figure for quantizing the CFM
estimator's feed-forward output layers: S3Gen alone over 100 random speech tokens, fp32
against int8 dynamic quantization as it was (``quantize_dynamic`` skipped diffusers'
``LoRACompatibleLinear`` layers) and as it is now (``optimizations.apply_s3gen_int8_dynamic``),
alternated four times in one process. Run from the repository root:

    OMP_NUM_THREADS=2 python docs/experiments/s3gen_int8_layers.py random
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.ao.quantization import quantize_dynamic  # noqa: E402

from chatterbox_demo import optimizations  # noqa: E402
from chatterbox_demo.manager import ModelManager  # noqa: E402


def main(weights: str) -> None:
    manager = ModelManager(weights, device="cpu", cache_dir=Path(tempfile.mkdtemp()),
                           shipped_voices=ROOT / "voices")
    tts = manager.load().tts
    conds, _ = manager.library.conditionals(manager.library.get("bright-high"))
    before = copy.deepcopy(tts.s3gen)
    estimator = before.flow.decoder.estimator
    before.flow.decoder.estimator = quantize_dynamic(estimator, {nn.Linear}, dtype=torch.qint8)
    variants = {"fp32": tts.s3gen, "int8 before": before,
                "int8 now": optimizations.apply_s3gen_int8_dynamic(copy.deepcopy(tts.s3gen))}
    tokens = torch.randint(0, 6561, (100,), generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for s3gen in variants.values():  # warm-up
            s3gen.inference(speech_tokens=tokens[:20], ref_dict=conds.gen)
        for _ in range(4):  # alternated, so drifts in the machine's speed hit every variant
            for name, s3gen in variants.items():
                torch.manual_seed(0)
                started = time.perf_counter()
                s3gen.inference(speech_tokens=tokens, ref_dict=conds.gen)
                times[name].append(time.perf_counter() - started)
    for name, seconds in times.items():
        print(f"{name}: median {statistics.median(seconds):.2f} s "
              f"({', '.join(f'{s:.2f}' for s in seconds)})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny")
