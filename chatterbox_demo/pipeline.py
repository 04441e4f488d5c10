"""The stock Chatterbox generation, split into timed stages.

Upstream ``ChatterboxTTS.generate`` does the same work but hard-codes 1000 new tokens,
takes no seed and times nothing. This module keeps its semantics step for step (text
normalisation, CFG batch, start/stop padding, token filtering, watermark) so that the
``baseline`` preset measures the real upstream path.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from chatterbox.models.s3tokenizer import S3_TOKEN_RATE, SPEECH_VOCAB_SIZE, drop_invalid_tokens
from chatterbox.models.t3.modules.cond_enc import T3Cond
from chatterbox.tts import ChatterboxTTS, Conditionals, punc_norm

from .config import BASELINE, GenerationParams, OptimizationConfig
from .fast_t3 import FastT3Decoder
from .optimizations import cfm_guidance


class GenerationError(RuntimeError):
    """The model ran but produced nothing usable; the message says what to try."""


@dataclass
class StageResult:
    wav: np.ndarray  # mono float32 at ``sample_rate``
    sample_rate: int
    t3_s: float
    t3_tokens: int  # speech tokens sampled by T3, before invalid ones are dropped
    s3gen_s: float
    watermark_s: float
    speech_tokens: list[int] = field(default_factory=list)  # what S3Gen rendered


def sync(device: str | torch.device) -> None:
    """Wait for queued device work so that a host clock measures it."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


@contextmanager
def timed(device, into: dict, key: str):
    sync(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        sync(device)
        into[key] = time.perf_counter() - start


def trim_prompt(gen: dict, seconds: float | None) -> dict:
    """A copy of S3Gen's reference dict keeping its first ``seconds`` (all when None).
    Always a copy: S3Gen casts the dict's tensors in place, which would silently change
    the cached conditionals."""
    ref = dict(gen)
    if seconds is None:
        return ref
    tokens = int(seconds * S3_TOKEN_RATE)  # 25 prompt tokens per second
    ref["prompt_token"] = ref["prompt_token"][:, :tokens]
    ref["prompt_token_len"] = torch.clamp(ref["prompt_token_len"], max=tokens)
    ref["prompt_feat"] = ref["prompt_feat"][:, : 2 * tokens]  # 2 mel frames per token
    return ref


@contextmanager
def suppress_stop_token(t3):
    """Make the stop token impossible to sample, for either decoder, by masking its logit
    at the speech head. Benchmarks use it so every row decodes the same number of tokens."""
    stop = t3.hp.stop_speech_token

    def mask_stop(module, inputs, output):
        # Finite, not -inf: CFG subtracts the two rows, and -inf - -inf is NaN. exp(-1e4)
        # is 0 in every float type, so the token still cannot be drawn.
        output[..., stop] = -1e4
        return output

    handle = t3.speech_head.register_forward_hook(mask_stop)
    try:
        yield
    finally:
        handle.remove()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def t3_cond_for(conds: Conditionals, exaggeration: float, device,
                dtype: torch.dtype = torch.float32) -> T3Cond:
    """A fresh T3Cond per call, in the T3's precision: T3 caches the prompt embedding on
    the object it is given, and a cached embedding must never leak from one model variant
    into another."""
    base = conds.t3
    return T3Cond(
        speaker_emb=base.speaker_emb,
        cond_prompt_speech_tokens=base.cond_prompt_speech_tokens,
        emotion_adv=exaggeration * torch.ones(1, 1, 1),
    ).to(device=device, dtype=dtype)


def padded_text_tokens(tts: ChatterboxTTS, t3, text: str) -> torch.Tensor:
    """Upstream's text preparation: punctuation normalised, tokenized, between T3's start
    and stop tokens; (1, L) on the model's device."""
    tokens = tts.tokenizer.text_to_tokens(punc_norm(text)).to(tts.device)
    tokens = F.pad(tokens, (1, 0), value=t3.hp.start_text_token)
    return F.pad(tokens, (0, 1), value=t3.hp.stop_text_token)


def run(tts: ChatterboxTTS, text: str, conds: Conditionals, exaggeration: float,
        params: GenerationParams, max_new_tokens: int,
        config: OptimizationConfig = BASELINE, t3=None, s3gen=None,
        ignore_stop: bool = False) -> StageResult:
    """Text plus ready conditionals to watermarked audio, timing T3, S3Gen and watermark.

    ``t3`` and ``s3gen`` are the model variant to run (default: the ones inside ``tts``);
    ``config`` picks the decoder and the CFM settings. ``ignore_stop`` makes T3 produce
    exactly ``max_new_tokens`` tokens, so benchmark rows compare like with like.
    """
    t3 = t3 or tts.t3
    s3gen = s3gen or tts.s3gen
    device = tts.device
    times: dict[str, float] = {}
    t3_cond = t3_cond_for(conds, exaggeration, device, t3.speech_emb.weight.dtype)

    text_tokens = padded_text_tokens(tts, t3, text)
    # Row 2 is the unconditional one. Upstream skips it when cfg_weight is 0, but its
    # T3.inference then fails (it always builds a batch of 2); with the row present and a
    # weight of 0 the guided logits are exactly the conditional ones, so keep it.
    text_tokens = torch.cat([text_tokens, text_tokens], dim=0)

    seed_everything(params.seed)
    with torch.inference_mode():
        sampling = dict(t3_cond=t3_cond, text_tokens=text_tokens,
                        max_new_tokens=max_new_tokens, temperature=params.temperature,
                        cfg_weight=params.cfg_weight,
                        repetition_penalty=params.repetition_penalty, min_p=params.min_p,
                        top_p=params.top_p)
        with timed(device, times, "t3"), suppress_stop_token(t3) if ignore_stop else nullcontext():
            if config.t3_decoder == "fast":
                step_mode = "cuda-graph" if config.cuda_graphs else "plain"
                speech_tokens = FastT3Decoder(t3, step_mode=step_mode).generate(**sampling)
            else:
                speech_tokens = t3.inference(**sampling)
        sampled = int(speech_tokens.shape[-1])
        speech_tokens = drop_invalid_tokens(speech_tokens[0])
        speech_tokens = speech_tokens[speech_tokens < SPEECH_VOCAB_SIZE].to(device)
        # S3Gen needs two speech tokens: from one it makes less audio than its fade-in and
        # fails with a tensor size mismatch.
        if speech_tokens.numel() < 2:
            raise GenerationError(
                "The model stopped before producing any speech; try another seed or text, "
                "or a larger token budget."
            )
        with timed(device, times, "s3gen"):
            ref_dict = trim_prompt(conds.gen, config.prompt_seconds)
            with cfm_guidance(s3gen, config.cfm_cfg):
                wav, _ = s3gen.inference(speech_tokens=speech_tokens, ref_dict=ref_dict,
                                         n_cfm_timesteps=config.cfm_steps)
        wav = wav.squeeze(0).detach().float().cpu().numpy()
    with timed("cpu", times, "watermark"):
        wav = tts.watermarker.apply_watermark(wav, sample_rate=tts.sr)
    return StageResult(
        wav=np.asarray(wav, dtype=np.float32),
        sample_rate=tts.sr,
        t3_s=times["t3"],
        t3_tokens=sampled,
        s3gen_s=times["s3gen"],
        watermark_s=times["watermark"],
        speech_tokens=speech_tokens.tolist(),
    )
