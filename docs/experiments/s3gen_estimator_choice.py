"""Which CFM estimator `cpu-fast` should take on a CPU, and whether CFG's two rows should
run side by side there: the S3Gen variants of the presets `cached` (fp32), `s3gen-bf16`
and `s3gen-int8` (int8 dynamic Linear layers), each built as the manager builds it, and
each also with `cfm_parallel_rows` (a variant named `+rows`; `s3gen-int8+rows` is
`cpu-fast`'s S3Gen where the CPU has no AMX), rendering the same 100 speech tokens with
the first voice's prompt (upstream semantics: 10 CFM steps with CFG, the whole prompt).
One untimed pass each, then ROUNDS passes taking turns (this machine's speed drifts
within minutes), and each variant's mel against fp32's for the same tokens and noise.
Prints the CPU's flags that pick paths, the medians, and the SNRs. Run from the
repository root; about eight minutes with the full-size model:

    OMP_NUM_THREADS=2 python docs/experiments/s3gen_estimator_choice.py random
"""

from __future__ import annotations

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

from chatterbox_demo import fidelity, hardware  # noqa: E402
from chatterbox_demo.config import PRESETS  # noqa: E402
from chatterbox_demo.manager import ModelManager  # noqa: E402
from chatterbox_demo.optimizations import build_s3gen, cfm_parallel_rows  # noqa: E402

ROUNDS = 5
PRESET_NAMES = ("cached", "s3gen-bf16", "s3gen-int8")


def main(weights: str) -> None:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    print(f"CPU flags that pick paths: {hardware.path_flags()}")
    manager = ModelManager(weights, device="cpu", cache_dir=Path(tempfile.mkdtemp()),
                           shipped_voices=ROOT / "voices")
    tts = manager.load().tts
    conds, _ = manager.library.conditionals(manager.library.get(manager.library.names()[0]))
    built = {name: build_s3gen(tts.s3gen, PRESETS[name]) for name in PRESET_NAMES}
    # (S3Gen, rows side by side) per variant name.
    variants = {f"{name}{'+rows' if rows else ''}": (s3gen, rows)
                for name, s3gen in built.items() for rows in (False, True)}
    tokens = torch.randint(0, 6561, (100,), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        mels = {name: fidelity.mel(s3gen, conds, tokens, steps=10, cfg=True,  # untimed
                                   parallel_rows=rows)
                for name, (s3gen, rows) in variants.items()}
        for _ in range(ROUNDS):
            for name, (s3gen, rows) in variants.items():
                torch.manual_seed(0)
                started = time.perf_counter()
                with cfm_parallel_rows(s3gen, rows):
                    s3gen.inference(speech_tokens=tokens, ref_dict=conds.gen)
                times[name].append(time.perf_counter() - started)
    fp32 = statistics.median(times["cached"])
    for name in variants:
        median = statistics.median(times[name])
        print(f"{name}: S3Gen median {median:.2f} s of {ROUNDS} "
              f"({', '.join(f'{t:.2f}' for t in times[name])}), {fp32 / median:.2f}x fp32, "
              f"mel SNR {fidelity.snr_db(mels['cached'], mels[name]):.1f} dB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny")
