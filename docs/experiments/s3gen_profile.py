"""The profile behind docs/benchmarks.md's account of where S3Gen's time goes on a CPU:
one S3Gen pass over 100 random speech tokens with the first voice's prompt (upstream
semantics: 10 CFM steps with CFG, the whole prompt), fp32 (`baseline`) and with the CFM
estimator's Linear layers in int8 dynamic (`cpu-fast` on a CPU without bf16
instructions), each timed once, then run under ``torch.profiler``; prints the operators
by self time. Run from the repository root; about two minutes with the full-size model:

    OMP_NUM_THREADS=2 python docs/experiments/s3gen_profile.py random
"""

from __future__ import annotations

import copy
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

from chatterbox_demo import optimizations  # noqa: E402
from chatterbox_demo.manager import ModelManager  # noqa: E402


def main(weights: str) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    manager = ModelManager(weights, device="cpu", cache_dir=Path(tempfile.mkdtemp()),
                           shipped_voices=ROOT / "voices")
    tts = manager.load().tts
    voice = manager.library.names()[0]
    conds, _ = manager.library.conditionals(manager.library.get(voice))
    print(f"voice {voice}: {conds.gen['prompt_token'].shape[1]} prompt tokens")
    variants = {"fp32": tts.s3gen,
                "int8 dynamic": optimizations.apply_s3gen_int8_dynamic(copy.deepcopy(tts.s3gen))}
    tokens = torch.randint(0, 6561, (100,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for name, s3gen in variants.items():
            s3gen.inference(speech_tokens=tokens[:20], ref_dict=conds.gen)  # warm-up
            torch.manual_seed(0)
            started = time.perf_counter()
            s3gen.inference(speech_tokens=tokens, ref_dict=conds.gen)
            print(f"{name}: {time.perf_counter() - started:.2f} s, wall")
            with profile() as prof:
                s3gen.inference(speech_tokens=tokens, ref_dict=conds.gen)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny")
