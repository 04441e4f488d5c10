"""The one-off experiment behind docs/benchmarks.md's "S3Gen int8 static quantization
(PT2E)" figures: export S3Gen's CFM estimator, quantize it statically with the x86 Inductor
quantizer (calibrated on the estimator calls of one fp32 run), compile it, and time an S3Gen
pass over 100 random speech tokens against fp32 and bf16, with mel SNR against fp32.

Not part of the app (it took 8 minutes of compiling for no gain). Run from the repository
root; about 15 minutes with the full-size random model on 2 cores:

    OMP_NUM_THREADS=2 python docs/experiments/s3gen_int8_static.py random
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
import torch.ao.quantization.quantizer.x86_inductor_quantizer as xiq  # noqa: E402
from chatterbox.models.s3gen import decoder as decoder_module  # noqa: E402
from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: E402
from torch.export import Dim, export_for_training  # noqa: E402

from chatterbox_demo import fidelity  # noqa: E402
from chatterbox_demo.manager import ModelManager  # noqa: E402


class Compiled(torch.nn.Module):
    """The compiled quantized estimator where S3Gen's solver expects its estimator: it
    calls ``.forward(**inputs)`` and reads ``.dtype``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    @property
    def dtype(self):
        return torch.float32

    def forward(self, **inputs):
        return self.fn(**inputs)


def timed_mel(s3gen, conds, tokens, label):
    started = time.time()
    mel = fidelity.mel(s3gen, conds, tokens, 10, True)
    print(f"{label} S3Gen pass: {time.time() - started:.1f} s", flush=True)
    return mel


def main(weights: str) -> None:
    manager = ModelManager(weights, device="cpu", cache_dir=Path(tempfile.mkdtemp()),
                           shipped_voices=ROOT / "voices")
    s3gen = manager.load().tts.s3gen
    conds, _ = manager.library.conditionals(manager.library.get("calm-mid"))
    tokens = torch.randint(0, 6561, (1, 100))

    # Record the estimator's inputs during one fp32 pass (the solver calls .forward).
    estimator, calls = s3gen.flow.decoder.estimator, []
    forward = estimator.forward
    estimator.forward = lambda **kw: calls.append(kw) or forward(**kw)
    timed_mel(s3gen, conds, tokens, "fp32 (recording)")
    del estimator.forward

    def inputs(call):  # normal tensors, not inference-mode ones
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in call.items()}

    # Upstream's chunk-mask helper has a data-dependent .item() check that cannot be
    # exported; at inference the mask is all ones, so the check never fires.
    decoder_module.add_optional_chunk_mask = lambda xs, masks, *args, **kwargs: masks
    frames = Dim("T", min=8, max=4000)
    shapes = {k: None for k in calls[0]}
    shapes.update({"x": {2: frames}, "mask": {2: frames}, "mu": {2: frames},
                   "cond": {2: frames}})
    started = time.time()
    exported = export_for_training(copy.deepcopy(estimator), args=(),
                                   kwargs=inputs(calls[0]), dynamic_shapes=shapes).module()
    print(f"export: {time.time() - started:.1f} s", flush=True)

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for call in calls[:10]:
            prepared(**inputs(call))
    compiled = torch.compile(convert_pt2e(prepared), dynamic=True)
    started = time.time()
    with torch.no_grad():
        compiled(**inputs(calls[0]))
    print(f"compile and first call: {time.time() - started:.1f} s", flush=True)

    quantized = copy.deepcopy(s3gen)
    quantized.flow.decoder.estimator = Compiled(compiled)
    for run in (1, 2):
        int8 = timed_mel(quantized, conds, tokens, f"int8 static, run {run}")
    reference = timed_mel(s3gen, conds, tokens, "fp32")
    print(f"int8 static mel SNR against fp32: {fidelity.snr_db(reference, int8):.2f} dB")

    bf16 = copy.deepcopy(s3gen)
    bf16.flow.decoder.estimator.to(torch.bfloat16)
    for run in (1, 2):
        mel = timed_mel(bf16, conds, tokens, f"bf16, run {run}")
    print(f"bf16 mel SNR against fp32: {fidelity.snr_db(reference, mel):.2f} dB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny")
