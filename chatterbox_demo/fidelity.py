"""How closely an optimized model agrees with the fp32 stock one, on identical inputs.

The real weights are not reachable everywhere this runs, so quality is measured as
agreement with fp32 rather than by listening: T3's teacher-forced logits over a fixed token
sequence (cosine similarity, top-1 agreement) and S3Gen's mel spectrogram for the same
speech tokens and noise (SNR in dB).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from chatterbox.models.s3tokenizer import SPEECH_VOCAB_SIZE
from chatterbox.tts import Conditionals

from .config import UPSTREAM_CFM_STEPS
from .optimizations import cfm_guidance, cfm_parallel_rows
from .pipeline import t3_cond_for, trim_prompt


@dataclass
class Fidelity:
    logits_cosine: float  # mean over positions of the cosine of speech logits; 1 is identical
    top1_agreement: float  # share of positions whose most likely token is the same
    mel_snr_db: float  # fp32 mel power over difference power; inf when identical


def teacher_forced_logits(t3, conds: Conditionals, text_tokens: torch.Tensor,
                          speech_tokens: torch.Tensor) -> torch.Tensor:
    """Speech logits (T, vocab) for ``speech_tokens`` given the text, in one forward pass."""
    device = t3.speech_emb.weight.device
    cond = t3_cond_for(conds, float(conds.t3.emotion_adv.reshape(-1)[0]), device,
                       t3.speech_emb.weight.dtype)
    text = text_tokens.to(device).view(1, -1)
    speech = speech_tokens.to(device).view(1, -1)
    with torch.inference_mode():
        out = t3.forward(t3_cond=cond, text_tokens=text,
                         text_token_lens=torch.tensor([text.shape[1]], device=device),
                         speech_tokens=speech,
                         speech_token_lens=torch.tensor([speech.shape[1]], device=device))
    return out.speech_logits[0].float()


def mel(s3gen, conds: Conditionals, speech_tokens: torch.Tensor, steps: int, cfg: bool,
        seed: int = 0, prompt_seconds: float | None = None,
        parallel_rows: bool = False) -> torch.Tensor:
    """S3Gen's output mel for ``speech_tokens`` with the CFM noise drawn from ``seed``."""
    torch.manual_seed(seed)
    with cfm_guidance(s3gen, cfg), cfm_parallel_rows(s3gen, parallel_rows):
        out = s3gen.flow_inference(speech_tokens.to(s3gen.device).view(1, -1),
                                   ref_dict=trim_prompt(conds.gen, prompt_seconds),
                                   n_cfm_timesteps=steps, finalize=True)
    return out.float()


def snr_db(reference: torch.Tensor, other: torch.Tensor) -> float:
    # Clips of different lengths (other tokens, or one stopping earlier) are compared over
    # their common start. (A shorter reference prompt no longer makes one: trim_prompt.)
    frames = min(reference.shape[-1], other.shape[-1])
    reference, other = reference[..., :frames], other[..., :frames]
    noise = (reference - other).pow(2).sum().item()
    signal = reference.pow(2).sum().item()
    if noise == 0:
        return math.inf
    # An all-zero reference against anything else: no signal at all, -inf dB (log10(0)
    # raised a math domain error). Not finite, so strict JSON writes it as null like inf.
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def compare_logits(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    cosine = F.cosine_similarity(reference, other, dim=-1).mean().item()
    top1 = (reference.argmax(-1) == other.argmax(-1)).float().mean().item()
    return cosine, top1


@dataclass
class Reference:
    """The fp32 stock outputs every variant is held against, computed once per run."""

    logits: torch.Tensor
    mel: torch.Tensor


@contextmanager
def full_fp32():
    """TF32 off while the block runs: a configuration with ``tf32`` set turns it on for the
    whole process, and the reference must be fp32 proper."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def reference(pristine_t3, pristine_s3gen, conds: Conditionals, text_tokens: torch.Tensor,
              speech_tokens: torch.Tensor) -> Reference:
    valid = speech_tokens[speech_tokens < SPEECH_VOCAB_SIZE]
    with full_fp32():
        return Reference(teacher_forced_logits(pristine_t3, conds, text_tokens, speech_tokens),
                         mel(pristine_s3gen, conds, valid, UPSTREAM_CFM_STEPS, True))


def measure(ref: Reference, t3, s3gen, conds: Conditionals, text_tokens: torch.Tensor,
            speech_tokens: torch.Tensor, cfm_steps: int, cfm_cfg: bool,
            prompt_seconds: float | None = None, parallel_rows: bool = False) -> Fidelity:
    """Agreement of (t3, s3gen, CFM settings) with the fp32 stock reference (10 steps,
    CFG on), on the same tokens and noise."""
    cosine, top1 = compare_logits(
        ref.logits, teacher_forced_logits(t3, conds, text_tokens, speech_tokens))
    valid = speech_tokens[speech_tokens < SPEECH_VOCAB_SIZE]
    other = mel(s3gen, conds, valid, cfm_steps, cfm_cfg, prompt_seconds=prompt_seconds,
                parallel_rows=parallel_rows)
    return Fidelity(cosine, top1, snr_db(ref.mel, other))
