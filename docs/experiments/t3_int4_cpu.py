"""The one-off experiment behind docs/benchmarks.md's "T3 int4 weight-only" figures: T3's
Linear layers in int4 on PyTorch's own CPU kernel (``_weight_int4pack_mm_for_cpu``, the one
torchao's CPU int4 layout calls) against torch.ao int8 dynamic quantization, both in the
fast decoder: prefill time, decode tokens/s, and teacher-forced logits against fp32.

Not part of the app: on the 2-core CPU it was measured on, int4 decoded only slightly
faster than int8, prefilled slower, and agreed far less with fp32. Run from the repository
root; a few minutes with the full-size random model:

    OMP_NUM_THREADS=2 python docs/experiments/t3_int4_cpu.py random
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
from torch import nn  # noqa: E402

from chatterbox_demo import fidelity, optimizations  # noqa: E402
from chatterbox_demo.fast_t3 import FastT3Decoder  # noqa: E402
from chatterbox_demo.manager import ModelManager  # noqa: E402
from chatterbox_demo.pipeline import padded_text_tokens, t3_cond_for  # noqa: E402


class Int4Linear(nn.Module):
    """A Linear layer with int4 weights packed for the CPU kernel: round-to-nearest,
    asymmetric, per group of input channels, ``w ~ (q - 8) * scale + zero``. The kernel's
    fast path takes bf16 activations (fp32 ones take a reference loop, 60x slower here),
    so the input is cast to bf16 and the output back."""

    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        groups = weight.reshape(out_features, in_features // group_size, group_size)
        low = groups.amin(dim=-1, keepdim=True)
        scale = ((groups.amax(dim=-1, keepdim=True) - low) / 15).clamp(min=1e-12)
        q = torch.round((groups - low) / scale).clamp(0, 15).to(torch.int32)
        zero = low + 8 * scale
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.reshape(out_features, in_features), 1)
        self.scales_and_zeros = torch.stack(
            [scale.squeeze(-1).t(), zero.squeeze(-1).t()], dim=-1).contiguous().bfloat16()
        self.group_size, self.out_features = group_size, out_features

    def forward(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, x.shape[-1]).bfloat16(), self.packed, self.group_size,
            self.scales_and_zeros)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def int4_t3(pristine, group_size: int):
    t3 = copy.deepcopy(optimizations.without_patched_model(pristine))
    for parent in list(t3.tfmr.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int4Linear(child, group_size))
    return t3.eval()


def int8_t3(pristine):
    t3 = copy.deepcopy(optimizations.without_patched_model(pristine))
    return optimizations.apply_t3_int8_dynamic(t3).eval()


def timed_generation(t3, inputs: dict, tokens: int, step_mode: str = "plain",
                     **decoder_options) -> float:
    torch.manual_seed(0)
    started = time.perf_counter()
    FastT3Decoder(t3, step_mode=step_mode, **decoder_options).generate(
        **inputs, max_new_tokens=tokens, stop_on_eos=False)
    return time.perf_counter() - started


def compare(weights: str, build_variants, step_modes=("plain",)) -> None:
    """Load ``weights``; for each T3 that ``build_variants(pristine_t3)`` returns (name to
    module), print its teacher-forced logits' agreement with fp32, then its prefill time and
    decode tokens/s in the fast decoder, in each of ``step_modes``, alternated twice."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    manager = ModelManager(weights, device="cpu", cache_dir=Path(tempfile.mkdtemp()),
                           shipped_voices=ROOT / "voices")
    tts = manager.load().tts
    conds, _ = manager.library.conditionals(manager.library.get("calm-mid"))
    text = "The old lighthouse stood at the edge of the cliff."
    text_tokens = padded_text_tokens(tts, tts.t3, text)
    inputs = {"t3_cond": t3_cond_for(conds, 0.5, "cpu"),
              "text_tokens": torch.cat([text_tokens, text_tokens])}
    speech_tokens = torch.randint(0, 6561, (100,), generator=torch.Generator().manual_seed(0))
    reference = fidelity.teacher_forced_logits(tts.t3, conds, text_tokens, speech_tokens)

    variants = build_variants(tts.t3)
    for name, t3 in variants.items():
        cosine, top1 = fidelity.compare_logits(
            reference, fidelity.teacher_forced_logits(t3, conds, text_tokens, speech_tokens))
        print(f"{name}: logits cosine {cosine:.4f}, top-1 {top1:.2f}", flush=True)
        for mode in step_modes:
            timed_generation(t3, inputs, 8, mode)  # warm-up (and a traced step's recording)
    for run in (1, 2):  # alternated, so drifts in the machine's speed hit every variant
        for name, t3 in variants.items():
            for mode in step_modes:
                first = timed_generation(t3, inputs, 1, mode)
                whole = timed_generation(t3, inputs, 101, mode)
                label = name if step_modes == ("plain",) else f"{name}, {mode} step"
                print(f"run {run} {label}: prefill + 1 token {first:.2f} s, 101 tokens "
                      f"{whole:.2f} s, decode {100 / (whole - first):.1f} tokens/s",
                      flush=True)


def main(weights: str) -> None:
    compare(weights, lambda t3: {"int8-dynamic": int8_t3(t3), "int4 g128": int4_t3(t3, 128),
                                 "int4 g32": int4_t3(t3, 32)})


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny")
