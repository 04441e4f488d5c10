"""The stock Chatterbox generation, split into timed stages.

Upstream ``ChatterboxTTS.generate`` does the same work but hard-codes 1000 new tokens,
takes no seed and times nothing. This module keeps its semantics step for step (text
normalisation, CFG batch, start/stop padding, token filtering, watermark) so that the
``baseline`` preset measures the real upstream path. One deliberate difference: which
sampled tokens reach S3Gen (see ``_speakable``), where upstream fails or drops speech.
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from chatterbox.models.s3tokenizer import S3_TOKEN_RATE, SPEECH_VOCAB_SIZE
from chatterbox.models.t3.modules.cond_enc import T3Cond
from chatterbox.tts import ChatterboxTTS, Conditionals, punc_norm

from .config import BASELINE, GenerationParams, OptimizationConfig
from .fast_t3 import FastT3Decoder
from .optimizations import INDUCTOR_GRAPH_MODES, cfm_guidance, cfm_parallel_rows

# The stop token's id: one past the start token, itself the first id past the speech
# vocabulary (T3Config's stop_speech_token, a constant of the checkpoint format).
STOP_SPEECH_TOKEN = SPEECH_VOCAB_SIZE + 1
CFG_BATCH = 2  # T3 always runs the conditional and the unconditional row (see _sampling)


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
    # Two mel frames per token, and whatever the whole prompt has beyond that (upstream's
    # reference often has one frame more than twice its tokens): S3Gen's output starts
    # where the prompt's frames end, so cutting that frame too shifted the output by one
    # frame, and the mel SNR against the whole prompt compared neighbouring frames.
    extra = ref["prompt_feat"].shape[1] - 2 * ref["prompt_token"].shape[1]
    ref["prompt_token"] = ref["prompt_token"][:, :tokens]
    ref["prompt_token_len"] = torch.clamp(ref["prompt_token_len"], max=tokens)
    ref["prompt_feat"] = ref["prompt_feat"][:, : max(0, 2 * tokens + extra)]
    return ref


@contextmanager
def suppress_stop_token(t3):
    """Make the stop token impossible for the stock decoder to sample, by masking its logit
    at the speech head (the fast decoder masks the same logit itself: a hook would not
    reach its traced step). Benchmarks use it so every row decodes the same number of
    tokens."""
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


def _sampling(tts: ChatterboxTTS, t3, text: str, conds: Conditionals, exaggeration: float,
              params: GenerationParams, max_new_tokens: int) -> dict:
    """T3's inputs, as upstream's ``generate`` builds them."""
    t3_cond = t3_cond_for(conds, exaggeration, tts.device, t3.speech_emb.weight.dtype)
    text_tokens = padded_text_tokens(tts, t3, text)
    # Row 2 is the unconditional one. Upstream skips it when cfg_weight is 0, but its
    # T3.inference then fails (it always builds a batch of 2); with the row present and a
    # weight of 0 the guided logits are exactly the conditional ones, so keep it.
    text_tokens = torch.cat([text_tokens] * CFG_BATCH, dim=0)
    return dict(t3_cond=t3_cond, text_tokens=text_tokens, max_new_tokens=max_new_tokens,
                temperature=params.temperature, cfg_weight=params.cfg_weight,
                repetition_penalty=params.repetition_penalty, min_p=params.min_p,
                top_p=params.top_p)


def prepare_decoder(t3, config: OptimizationConfig) -> None:
    """Record the fast decoder's traced step now, where it will be used, rather than in
    the first generation (about two seconds at full size)."""
    if config.t3_decoder == "fast" and step_mode(t3, config) == "traced":
        FastT3Decoder(t3, step_mode="traced").traced_step(CFG_BATCH)


def _token_blocks(t3, sampling: dict, config: OptimizationConfig, ignore_stop: bool):
    """Sampled tokens as (1, k) blocks: the fast decoder hands them over as it goes, the
    stock ``T3.inference`` all at once. ``ignore_stop``: the stop token cannot be drawn."""
    if config.t3_decoder == "fast":
        decoder = FastT3Decoder(t3, step_mode=step_mode(t3, config),
                                reuse_voice_prefix=config.t3_voice_prefix)
        yield from decoder.token_blocks(**sampling, allow_stop=not ignore_stop)
    else:
        with suppress_stop_token(t3) if ignore_stop else nullcontext():
            yield t3.inference(**sampling)


def step_mode(t3, config: OptimizationConfig) -> str:
    """How the fast decoder runs its single-token step: as CUDA graphs when asked, or on
    CUDA when the compile mode is one that captures graphs (T3's own compiled step is
    captured then, see optimizations.INDUCTOR_GRAPH_MODES); on a CPU replayed from a trace
    (the same operators, without Python's cost per operator), unless ``torch.compile`` is
    to compile the step, or the weights are torchao tensor subclasses (tracing through
    their dispatch warns that it may freeze a branch, and they are not the CPU's fast
    path); otherwise eagerly."""
    if config.cuda_graphs or (t3.device.type == "cuda"
                              and config.compile_mode in INDUCTOR_GRAPH_MODES):
        return "cuda-graph"
    if (t3.device.type == "cpu" and config.compile_mode == "off"
            and config.t3_quant != "int8-weight-only"):
        return "traced"
    return "plain"


def _speakable(tokens: torch.Tensor, device) -> torch.Tensor:
    """The sampled tokens S3Gen renders: the speech tokens, those below the speech
    vocabulary (so no start or stop token), of the conditional row.

    Upstream runs ``drop_invalid_tokens`` first, which keeps only what follows a sampled
    start token (the speech before it is lost) and fails outright on two of them. Its
    result depends on what it is given, so :func:`run` (the whole sequence) and
    :func:`run_stream` (block by block) rendered different tokens. This filter looks at
    each token alone, so whole or in blocks it keeps the same ones, for every decoder,
    ``baseline`` included: it matches upstream whenever no start token is sampled, and
    differs only where upstream loses speech or crashes. Like upstream it ends at the first
    stop token: both decoders end with it, but nothing after one is speech. (A stream's
    blocks end there too, so whole or in blocks the cut falls in the same place.)"""
    tokens = tokens[0] if tokens.dim() > 1 else tokens
    stops = (tokens == STOP_SPEECH_TOKEN).nonzero()
    if len(stops):
        tokens = tokens[: int(stops[0])]
    return tokens[tokens < SPEECH_VOCAB_SIZE].to(device)


@contextmanager
def seeded_apart(seed: int, device):
    """Torch's random state set from ``seed`` inside the block and restored after it.

    S3Gen draws its CFM noise and HiFT's from torch's global generator. Left where T3 left
    it, that state would depend on how many samples T3 drew, and the fast decoder draws up
    to ``stop_check_every - 1`` more than the stock one (it looks for the stop token in
    blocks and drops what follows), so the same tokens would give different audio. Every
    S3Gen call starts from the generation's seed instead, and T3's state is left as it was
    (a stream goes on decoding after each block it renders)."""
    device = torch.device(device)
    # torch.manual_seed reseeds every device's generator, so an accelerator's state must be
    # saved and restored too: on MPS, forking only the CPU's left a stream's next tokens
    # drawn from a reseeded generator, unlike run() with the same seed.
    if device.type in ("cuda", "mps"):
        fork = torch.random.fork_rng([device.index or 0], device_type=device.type)
    else:
        fork = torch.random.fork_rng([])
    with fork:
        torch.manual_seed(seed)
        yield


def _render(s3gen, tokens: torch.Tensor, conds: Conditionals,
            config: OptimizationConfig, seed: int) -> np.ndarray:
    """S3Gen: speech tokens to a mono float32 waveform, its noise drawn from ``seed``."""
    ref_dict = trim_prompt(conds.gen, config.prompt_seconds)
    with (seeded_apart(seed, tokens.device), cfm_guidance(s3gen, config.cfm_cfg),
          cfm_parallel_rows(s3gen, config.cfm_parallel_rows)):
        wav, _ = s3gen.inference(speech_tokens=tokens, ref_dict=ref_dict,
                                 n_cfm_timesteps=config.cfm_steps)
    return wav.squeeze(0).detach().float().cpu().numpy()


def _too_short() -> GenerationError:
    # S3Gen needs two speech tokens: from one it makes less audio than its fade-in and
    # fails with a tensor size mismatch.
    return GenerationError("The model stopped before producing any speech; try another seed "
                           "or text, or a larger token budget.")


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
    sampling = _sampling(tts, t3, text, conds, exaggeration, params, max_new_tokens)
    seed_everything(params.seed)
    with torch.inference_mode():
        with timed(device, times, "t3"):
            blocks = _token_blocks(t3, sampling, config, ignore_stop)
            speech_tokens = torch.cat(list(blocks), dim=1)
        sampled = int(speech_tokens.shape[-1])
        speech_tokens = _speakable(speech_tokens, device)
        if speech_tokens.numel() < 2:
            raise _too_short()
        with timed(device, times, "s3gen"):
            wav = _render(s3gen, speech_tokens, conds, config, params.seed)
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


# Streaming: S3Gen renders the tokens decoded so far in blocks. Small first, so audio starts
# early; four times larger after, because every S3Gen call pays for the whole reference
# prompt (about 500 mel frames) however few tokens it renders: on a 2-core CPU that is
# about 9 s a call, against 0.04 s per token rendered.
# Speech tokens before the first audio (0.48 s of speech): the fast decoder hands tokens
# over every 16 steps, and 12 is reached at the first hand-over even when a few of the 16
# are not speech (start/stop tokens, which random weights sample often).
FIRST_BLOCK = 12
BLOCK_GROWTH = 4
MAX_BLOCK = 256
LEFT_CONTEXT = 10  # tokens rendered again before a block, so S3Gen sees what precedes it
LOOKAHEAD = 3  # tokens held back at a block's end: S3Gen's encoder looks 3 tokens ahead


@dataclass
class StreamPiece:
    wav: np.ndarray  # watermarked audio; starts ``overlap`` samples early when ``continues``
    continues: bool  # a further rendering of the same speech as the piece before
    final: bool
    t3_s: float  # T3 and S3Gen time since the previous piece
    s3gen_s: float
    watermark_s: float
    t3_tokens: int  # sampled so far
    speech_tokens: list[int] = field(default_factory=list)  # rendered in this piece


def run_stream(tts: ChatterboxTTS, text: str, conds: Conditionals, exaggeration: float,
               params: GenerationParams, max_new_tokens: int, overlap: int,
               config: OptimizationConfig = BASELINE, t3=None, s3gen=None,
               ignore_stop: bool = False):
    """:func:`run` as a stream of :class:`StreamPiece`: T3 decodes, and whenever a block of
    new tokens is ready S3Gen renders it with ``LEFT_CONTEXT`` tokens before it. A piece
    starts ``overlap`` samples before the previous one ended, for a crossfade over audio
    both rendered. T3 samples the same tokens as :func:`run` with the same seed (each S3Gen
    call draws its noise apart, from the seed: :func:`seeded_apart`); only the rendering
    differs."""
    t3 = t3 or tts.t3
    s3gen = s3gen or tts.s3gen
    device = torch.device(tts.device)
    per_token = tts.sr // S3_TOKEN_RATE  # audio samples per speech token (960)
    sampling = _sampling(tts, t3, text, conds, exaggeration, params, max_new_tokens)
    seed_everything(params.seed)
    tokens = torch.zeros(0, dtype=torch.long, device=device)
    sampled, emitted, block, t3_s = 0, 0, FIRST_BLOCK, 0.0
    with torch.inference_mode():
        blocks = _token_blocks(t3, sampling, config, ignore_stop)
        while True:
            times: dict[str, float] = {}
            with timed(device, times, "t3"):
                raw = next(blocks, None)
            t3_s += times.pop("t3")  # decoding since the last piece, however many blocks
            final = raw is None
            if not final:
                sampled += raw.shape[-1]
                tokens = torch.cat([tokens, _speakable(raw, device)])
            while final or len(tokens) - emitted >= block:
                end = len(tokens) if final else min(emitted + block, len(tokens) - LOOKAHEAD)
                start = max(0, emitted - LEFT_CONTEXT)
                stop = len(tokens) if final else end + LOOKAHEAD
                if stop - start < 2:
                    raise _too_short()
                with timed(device, times, "s3gen"):
                    wav = _render(s3gen, tokens[start:stop], conds, config, params.seed)
                skip = (emitted - start) * per_token - (overlap if emitted else 0)
                wav = wav[skip:] if final else wav[skip:(end - start) * per_token]
                with timed("cpu", times, "watermark"):
                    wav = tts.watermarker.apply_watermark(wav, sample_rate=tts.sr)
                yield StreamPiece(np.asarray(wav, dtype=np.float32), continues=emitted > 0,
                                  final=final, t3_s=t3_s,
                                  s3gen_s=times["s3gen"], watermark_s=times["watermark"],
                                  t3_tokens=sampled, speech_tokens=tokens[emitted:end].tolist())
                emitted, block, t3_s = end, min(BLOCK_GROWTH * block, MAX_BLOCK), 0.0
                if final:
                    return
