"""Options: generation settings and optimization configurations, as frozen dataclasses.

The UI, CLI and benchmark read their choices (ranges, defaults, preset names) from here,
never from literals of their own.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, fields, replace

from . import hardware

# (low, high) bounds per generation setting; the UI sliders use the same numbers.
RANGES = {
    "exaggeration": (0.0, 2.0),
    "cfg_weight": (0.0, 1.0),
    "temperature": (0.05, 5.0),
    "top_p": (0.01, 1.0),
    "min_p": (0.0, 1.0),
    "repetition_penalty": (1.0, 2.0),
    "seed": (0, 2**32 - 1),
    "max_new_tokens": (1, 1000),
}
MAX_TEXT_CHARS = 1000  # about 60 s of speech: past this the model's alignment drifts
# Longer text is split into sentence chunks (longform.py), spoken one by one and joined.
MAX_LONG_TEXT_CHARS = 20_000
SPEECH_TOKENS_PER_SECOND = 25  # S3 tokenizer rate


@dataclass(frozen=True)
class GenerationParams:
    """What a user sets per generation. Defaults are upstream ``generate``'s."""

    # Emotion intensity fed to T3's conditioning; None means the voice's own value.
    exaggeration: float | None = None
    # Classifier-free guidance weight in T3; 0 turns CFG off (batch of 1 instead of 2).
    cfg_weight: float = 0.5
    temperature: float = 0.8
    top_p: float = 1.0
    min_p: float = 0.05
    repetition_penalty: float = 1.2
    # Same seed and settings give identical audio.
    seed: int = 0
    # Upper bound on speech tokens (25 per second of audio). None derives it from the text,
    # which matters with random weights: they almost never sample the stop token.
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in ("exaggeration", "max_new_tokens"):
                continue
            low, high = RANGES[f.name]
            integer = f.name in ("seed", "max_new_tokens")
            check_number(f.name, value, low, high, integer=integer)
            if integer:  # also turns numpy integers into plain ints
                object.__setattr__(self, f.name, int(value))
            else:
                object.__setattr__(self, f.name, float(value))


def check_number(name: str, value, low: float, high: float, integer: bool = False) -> None:
    """Raise ``ValueError`` naming the setting and its range unless ``value`` fits."""
    kind = "a whole number" if integer else "a number"
    span = f"at least {low}" if high == math.inf else f"between {low} and {high}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {kind} {span} (got {value!r})")
    # isnan only for floats: math.isnan(10**400) raises OverflowError, which the API
    # answered with a 500; comparing a whole number with the bounds never overflows.
    if (isinstance(value, float) and math.isnan(value)) or not low <= value <= high:
        raise ValueError(f"{name} must be {span} (got {value!r})")
    if integer and value != int(value):
        raise ValueError(f"{name} must be {kind} (got {value!r})")


def count_setting(name: str, default: int, high: float = math.inf) -> int:
    """A whole-number environment setting (``default`` when unset). Read where it is used,
    not when this module is imported, so that a bad value stops only what needs it (the
    page), not the CLI."""
    raw = os.environ.get(name)
    return default if raw is None else parse_count(name, raw, high)


def parse_count(name: str, raw: str, high: float = math.inf) -> int:
    """``raw`` as a whole number from 1 to ``high``; ``ValueError`` naming ``name`` if not."""
    try:
        value = int(raw)
    except ValueError:
        value = raw  # check_number names it as given
    check_number(name, value, 1, high, integer=True)
    return value


def queue_max() -> int:
    """Requests that may wait for the model (page and API each); past this they are refused
    at once with "queue is full" (page) or 503 (API). At least 1: Gradio's queue of size 0
    refuses every request."""
    return count_setting("CHATTERBOX_QUEUE_MAX", 32)


def upload_ttl_s() -> int:
    """Seconds after which the page deletes uploads and generated files. At least 1: a
    lifetime of 0 deletes an upload before the request that sent it can read it."""
    return count_setting("CHATTERBOX_UPLOAD_TTL", 600)


def default_max_new_tokens(text: str) -> int:
    """A token budget from the text: English speech runs about 15 characters a second,
    so allow 2.5 tokens per character (about 1.5x headroom) plus a second of slack."""
    low, high = RANGES["max_new_tokens"]
    return max(2 * SPEECH_TOKENS_PER_SECOND, min(high, int(len(text) * 2.5) + 25))


PRECISIONS = ("fp32", "fp16", "bf16")
T3_QUANTS = ("none", "int8-dynamic", "int8-weight-only")
S3GEN_QUANTS = ("none", "int8-dynamic", "int8-static")
T3_DECODERS = ("stock", "fast")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune",
                 "max-autotune-no-cudagraphs")
UPSTREAM_CFM_STEPS = 10


@dataclass(frozen=True)
class OptimizationConfig:
    """How the pipeline runs. Each field is one switch; the defaults are the stock path.

    Fields that change weights (precision, quantization, compile) make the manager build a
    model variant from its pristine fp32 copy; the others only change how a call runs.
    """

    # Reuse the voice library's conditionals (memory, then disk) instead of recomputing
    # them from the reference audio on every call as stock generate(audio_prompt_path=...)
    # does. Saves the whole conditioning stage (seconds on a CPU).
    cached_conditionals: bool = False
    # T3 weights and activations. bf16 halves the bytes each decode step reads (T3 decode is
    # memory-bound); CPUs without native bf16 gain less. fp16 is for GPUs.
    t3_dtype: str = "fp32"
    # int8-dynamic: torch.ao dynamic quantization of T3's Linear layers (CPU kernels only):
    # a quarter of the fp32 bytes per token. int8-weight-only: torchao, GPU and CPU.
    t3_quant: str = "none"
    # CPU, fp32: T3's float Linear layers (all of them; under int8-dynamic the speech head,
    # the one left float) run through oneDNN with their weights packed once, for the decode
    # step's batch of two. On a 2-core AVX2 EPYC, MKL (PyTorch's default) read the weights
    # of such a two-row matmul at 8-10 GB/s, oneDNN at 23-30; the same arithmetic in
    # another order (logits cosine 1.0000 against fp32). See docs/benchmarks.md.
    t3_onednn: bool = False
    # stock: the package's T3.inference untouched. fast: our static-cache decode loop with
    # SDPA and on-device sampling (same sampling semantics); on a CPU its single-token
    # step is replayed from a trace, unless torch.compile compiles it; see fast_t3.py.
    t3_decoder: str = "stock"
    # Fast decoder only: keep T3's keys and values for the voice's own prompt positions
    # (its speaker embedding and resampled reference speech tokens: the same for every
    # text), per T3 variant and voice, so that a prefill runs over the text alone. A kept
    # prefix is used only for identical embeddings. Same arithmetic, though int8 dynamic
    # layers then scale the text's activations by their own range.
    t3_voice_prefix: bool = False
    # CUDA only, fast decoder only: capture the single-token decode step as CUDA graphs
    # (one per 64 cache positions), so a token costs one launch instead of hundreds. With
    # compile_mode set, the compiled step is what is captured.
    cuda_graphs: bool = False
    # Precision of S3Gen's CFM estimator only; the vocoder, STFT, S3 tokenizer and voice
    # encoder stay fp32 (there is no bf16 STFT and they cost little).
    s3gen_dtype: str = "fp32"
    # int8-dynamic: torch.ao dynamic quantization of the CFM estimator's Linear layers
    # (CPU). int8-static: the PT2E flow, activations too calibrated on a reference run,
    # compiled ahead of time by Inductor into oneDNN int8 kernels (CPU; minutes of
    # compiling the first time on a machine, then loaded from the cache directory; the
    # fastest estimator without bf16 instructions).
    s3gen_quant: str = "none"
    # Euler steps in the CFM; fewer is faster and changes the audio (upstream: 10).
    cfm_steps: int = UPSTREAM_CFM_STEPS
    # Classifier-free guidance inside the CFM doubles its batch; off halves the work and
    # changes the audio.
    cfm_cfg: bool = True
    # CPU: compute the two halves of the CFM estimator's batch (CFG's conditional and
    # unconditional rows) side by side, each in its own thread on half of the cores,
    # rather than the whole batch spread over every core op by op: the same arithmetic
    # with fewer waits between cores (on a 2-core AVX2 EPYC, S3Gen 1.11x in fp32;
    # docs/benchmarks.md). Without CFG there is one row, and nothing changes.
    cfm_parallel_rows: bool = False
    # Seconds of the reference clip S3Gen conditions on (upstream: all of its 10 s). The
    # CFM's cost grows with prompt plus output frames, so a shorter prompt is faster; it
    # changes the audio.
    prompt_seconds: float | None = None
    # torch.compile of the hot parts (T3 decode step, CFM estimator, HiFT), warmed up when
    # the configuration is applied. In the modes that capture CUDA graphs (reduce-overhead,
    # max-autotune), T3 is compiled without Inductor's graphs and the fast decoder captures
    # its step itself, as with cuda_graphs (optimizations.INDUCTOR_GRAPH_MODES says why).
    compile_mode: str = "off"
    # torch intra-op threads; None keeps torch's default (one per core).
    cpu_threads: int | None = None
    # CUDA only: TF32 matmuls, and cuDNN autotuning (per new input shape: it pays where
    # shapes repeat, and costs where they do not, as in streaming; see gpu-fast).
    tf32: bool = False
    cudnn_benchmark: bool = False

    def __post_init__(self) -> None:
        for name, choices in (("t3_dtype", PRECISIONS), ("t3_quant", T3_QUANTS),
                              ("t3_decoder", T3_DECODERS), ("s3gen_dtype", PRECISIONS),
                              ("s3gen_quant", S3GEN_QUANTS), ("compile_mode", COMPILE_MODES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)} "
                                 f"(got {getattr(self, name)!r})")
        for f in fields(self):
            # A JSON "false" or null kept CFG on while the label said off.
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"{f.name} must be true or false "
                                 f"(got {getattr(self, f.name)!r})")
        check_number("cfm_steps", self.cfm_steps, 1, 50, integer=True)
        if self.prompt_seconds is not None:
            check_number("prompt_seconds", self.prompt_seconds, 0.5, 10.0)
        if self.cpu_threads is not None:
            check_number("cpu_threads", self.cpu_threads, 1, 256, integer=True)
        # Whole floats (4.0) pass the checks; torch wants ints, and preset_name's "4.0"
        # would not read back as one.
        object.__setattr__(self, "cfm_steps", int(self.cfm_steps))
        if self.cpu_threads is not None:
            object.__setattr__(self, "cpu_threads", int(self.cpu_threads))
        if self.t3_quant != "none" and self.t3_dtype != "fp32":
            raise ValueError("T3 quantization works from fp32 weights; set t3_dtype to fp32")
        if self.t3_onednn and (self.t3_dtype != "fp32" or self.t3_quant == "int8-weight-only"
                               or self.compile_mode != "off"):
            raise ValueError("t3_onednn packs T3's fp32 weights for oneDNN; it needs "
                             "t3_dtype fp32, no int8-weight-only and compile_mode off")
        if self.s3gen_quant != "none" and self.s3gen_dtype != "fp32":
            raise ValueError("S3Gen quantization works from fp32 weights; set s3gen_dtype to "
                             "fp32")
        if self.s3gen_quant == "int8-static" and self.cfm_parallel_rows:
            raise ValueError("S3Gen int8-static's compiled estimator takes the CFM's batch "
                             "of two whole; turn cfm_parallel_rows off or use int8-dynamic")
        if self.s3gen_quant == "int8-static" and not self.cfm_cfg:
            raise ValueError("S3Gen int8-static is built for the CFM's batch of two (CFG); "
                             "turn cfm_cfg on or use int8-dynamic")
        if self.cuda_graphs and self.t3_decoder != "fast":
            raise ValueError("cuda_graphs captures the fast decoder's step; set t3_decoder "
                             "to fast")
        if self.t3_voice_prefix and self.t3_decoder != "fast":
            raise ValueError("t3_voice_prefix is kept by the fast decoder; set t3_decoder "
                             "to fast")

    @property
    def changes_output(self) -> bool:
        """True when the audio is meant to differ from upstream's (fewer CFM steps or no
        CFG in the CFM), as opposed to differing by numerics only."""
        return (self.cfm_steps != UPSTREAM_CFM_STEPS or not self.cfm_cfg
                or self.prompt_seconds is not None)

    @property
    def compiles(self) -> bool:
        """True when building this configuration's variant compiles (``torch.compile`` on
        its first call, which the manager makes when it is applied; int8-static's package
        when none is kept yet): the warm-up is reported apart."""
        return self.compile_mode != "off" or self.s3gen_quant == "int8-static"


BASELINE = OptimizationConfig()
_CACHED = OptimizationConfig(cached_conditionals=True)


def cpu_fast(bf16_matrix_unit: bool, onednn: bool = True) -> OptimizationConfig:
    """The fastest CPU configuration with upstream semantics: fast decoder and int8 T3,
    its float speech head through oneDNN where PyTorch has it (on an AVX2 EPYC, decode
    4-19% faster than with MKL's); CFG's two CFM rows side by side, a thread each; the
    CFM estimator in bf16 where the CPU has bf16 matrix instructions (AMX: half of
    S3Gen's time), else its Linear layers in int8 (emulated bf16 runs slower than fp32;
    with AVX512-BF16 alone, bf16 was 5% slower than int8 on a Zen 4 EPYC and 8% on a
    Zen 5, and 9 dB further from fp32 on both)."""
    estimator = ({"s3gen_dtype": "bf16"} if bf16_matrix_unit
                 else {"s3gen_quant": "int8-dynamic"})
    return replace(_CACHED, t3_decoder="fast", t3_voice_prefix=True, t3_quant="int8-dynamic",
                   t3_onednn=onednn, cfm_parallel_rows=True, **estimator)


CPU_BF16 = hardware.native_bf16()
CPU_FAST = cpu_fast(hardware.bf16_matrix_unit(), hardware.has_onednn())

# For a CUDA GPU: bf16 T3 with the fast decoder as CUDA graphs, fp16 CFM estimator, TF32.
# Without cudnn.benchmark: with it, a streamed generation on an H100 took 9.2 s against
# 1.3 s one-shot, where the rows without it streamed within 1-3 s of their one-shot time
# (every streamed piece is a new shape to autotune for; not yet re-measured without it).
GPU_FAST = replace(_CACHED, t3_decoder="fast", t3_voice_prefix=True, t3_dtype="bf16",
                   cuda_graphs=True, s3gen_dtype="fp16", tf32=True)

PRESETS: dict[str, OptimizationConfig] = {
    # Exactly the upstream path: fp32, stock decoder, conditionals recomputed per call.
    "baseline": BASELINE,
    "cached": _CACHED,
    # One optimization each, on top of cached conditionals, so its own effect shows.
    "fast-decoder": replace(_CACHED, t3_decoder="fast"),
    "t3-voice-prefix": replace(_CACHED, t3_decoder="fast", t3_voice_prefix=True),
    "t3-bf16": replace(_CACHED, t3_dtype="bf16", t3_decoder="fast"),
    "t3-onednn": replace(_CACHED, t3_decoder="fast", t3_onednn=True),
    "t3-int8": replace(_CACHED, t3_quant="int8-dynamic", t3_decoder="fast"),
    "t3-int8-wo": replace(_CACHED, t3_quant="int8-weight-only", t3_decoder="fast"),
    "s3gen-bf16": replace(_CACHED, s3gen_dtype="bf16"),
    "s3gen-int8": replace(_CACHED, s3gen_quant="int8-dynamic"),
    "s3gen-int8-static": replace(_CACHED, s3gen_quant="int8-static"),
    "s3gen-parallel-rows": replace(_CACHED, cfm_parallel_rows=True),
    # torch.compile alone (on an AVX2 CPU: 0.86x baseline after 510 s, docs/benchmarks.md).
    "compiled": replace(_CACHED, compile_mode="default"),
    # Everything that keeps upstream semantics, for this CPU (see cpu_fast).
    "cpu-fast": CPU_FAST,
    # cpu-fast with the CFM estimator in static int8, compiled: minutes of compiling the
    # first time on a machine, so the app does not start on it.
    # Its package takes the CFM's batch of two whole, so the rows are not split.
    "cpu-compiled": replace(CPU_FAST, s3gen_dtype="fp32", s3gen_quant="int8-static",
                            cfm_parallel_rows=False),
    # cpu-fast plus knobs that change the audio: fewer CFM steps, no CFG in the CFM.
    "cpu-turbo": replace(CPU_FAST, cfm_steps=6, cfm_cfg=False),
    # For a CUDA GPU (see GPU_FAST).
    "gpu-fast": GPU_FAST,
    # gpu-fast with torch.compile: the decode step compiled and captured in the CUDA
    # graphs (on an H200, 532 against gpu-fast's 269 tokens/s), S3Gen's estimator and
    # HiFT compiled too (S3Gen 1.9x). About four minutes of compiling when applied (238 s
    # on an H200, docs/benchmarks.md run 4), so the app does not start on it.
    "gpu-compiled": replace(GPU_FAST, compile_mode="default"),
}
# One line per preset for the UI and docs: what it changes and where it helps.
PRESET_DESCRIPTIONS = {
    "baseline": "the stock upstream path: fp32, stock decoder, conditionals recomputed per call",
    "cached": "baseline + the voice library's cached conditionals",
    "fast-decoder": "cached + our static-cache T3 decode loop (SDPA, on-device sampling; "
                    "on a CPU the step replayed from a trace)",
    "t3-voice-prefix": "fast-decoder keeping T3's keys and values of the voice's prompt, so "
                       "the prefill runs over the text alone",
    "t3-bf16": "fast-decoder with T3 in bf16 (half the bytes per token)",
    "t3-onednn": "fast-decoder with T3's fp32 Linear layers through oneDNN, weights packed "
                 "once (CPU; output as fp32's)",
    "t3-int8": "fast-decoder with T3's Linear layers in int8 (CPU)",
    "t3-int8-wo": "fast-decoder with T3's Linear weights in int8, activations in float "
                  "(torchao; CPU and GPU)",
    "s3gen-bf16": "cached + S3Gen's CFM estimator in bf16",
    "s3gen-int8": "cached + S3Gen's CFM estimator Linear layers in int8 (CPU)",
    "s3gen-int8-static": "cached + S3Gen's CFM estimator in static int8 (PT2E, calibrated), "
                         "compiled (CPU; minutes of compiling the first time, then kept)",
    "s3gen-parallel-rows": "cached + CFG's two CFM estimator rows computed side by side, a "
                           "thread each on half of the cores (CPU; same arithmetic)",
    "compiled": "cached + torch.compile (default mode) of T3's layers, S3Gen's CFM estimator "
                "and HiFT: its own effect; minutes of compiling when applied, and measured no "
                "faster on a 2-core CPU",
    "cpu-fast": "fast decoder keeping the voice prefix, int8 T3"
                + (" (float head through oneDNN)" if CPU_FAST.t3_onednn else "")
                + ", CFM rows side by side"
                + (" and bf16 CFM estimator (this CPU has bf16 matrix instructions)"
                   if CPU_FAST.s3gen_dtype == "bf16" else
                   " and int8 CFM estimator (this CPU lacks bf16 matrix instructions)")
                + ": fastest with upstream semantics on a CPU",
    "cpu-compiled": "cpu-fast with the CFM estimator in static int8, compiled: faster S3Gen "
                    "after minutes of compiling the first time, then kept (CPU)",
    "cpu-turbo": "cpu-fast + 6 CFM steps without CFG: faster, audio differs from upstream",
    "gpu-fast": "fast decoder as CUDA graphs keeping the voice prefix, bf16 T3, fp16 CFM "
                "estimator, TF32: for CUDA GPUs",
    "gpu-compiled": "gpu-fast + torch.compile (default mode), the compiled decode step "
                    "captured in the CUDA graphs, S3Gen compiled: faster after about four "
                    "minutes of compiling",
}
DEFAULT_PRESET = "cached"
# What the app starts on, per device: the fastest preset that keeps upstream semantics.
DEVICE_PRESETS = {"cpu": "cpu-fast", "cuda": "gpu-fast", "mps": "cached"}


def device_preset(device: str) -> str:
    """The preset the app starts on for ``device``; what a refused one points to."""
    return DEVICE_PRESETS.get(device, DEFAULT_PRESET)


# The points of the speed-fidelity sweep (`bench --sweep`): cpu-fast with one knob that
# changes the audio moved at a time.
SWEEP = {
    "cfm-10-steps": replace(PRESETS["cpu-fast"]),
    "cfm-8-steps": replace(PRESETS["cpu-fast"], cfm_steps=8),
    "cfm-6-steps": replace(PRESETS["cpu-fast"], cfm_steps=6),
    "cfm-4-steps": replace(PRESETS["cpu-fast"], cfm_steps=4),
    "cfm-no-cfg": replace(PRESETS["cpu-fast"], cfm_cfg=False),
    "prompt-6s": replace(PRESETS["cpu-fast"], prompt_seconds=6.0),
    "prompt-3s": replace(PRESETS["cpu-fast"], prompt_seconds=3.0),
}


def preset_name(config: OptimizationConfig) -> str:
    """The name of the preset equal to ``config``; else the preset it differs least from,
    with each difference after a ``+`` ("cpu-fast+cfm_steps=4"), which says what a
    comparison changed and which :func:`config_from_spec` reads back."""
    def changes(name: str) -> list[str]:
        preset = PRESETS[name]
        return [f"{f.name}={_spec_text(getattr(config, f.name))}"
                for f in fields(OptimizationConfig)
                if getattr(config, f.name) != getattr(preset, f.name)]

    nearest = min(PRESETS, key=lambda name: len(changes(name)))  # ties: the first preset
    return "+".join([nearest, *changes(nearest)])


def _spec_text(value) -> str:
    if value is None or isinstance(value, bool):
        return str(value).lower()
    return str(value)


def get_preset(name: str) -> OptimizationConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"Unknown preset {name!r}; available: {', '.join(PRESETS)}"
        ) from None


def config_from_spec(spec: str) -> OptimizationConfig:
    """A preset, with fields changed after a ``+`` each: ``cached+compile_mode=max-autotune``.

    The benchmark's way to measure any configuration the A/B tab's advanced panel can
    build. ``ValueError`` names what is wrong."""
    name, *changes = spec.split("+")
    config = get_preset(name.strip())
    kinds = {f.name: f.type for f in fields(OptimizationConfig)}
    values = {}
    for change in changes:
        field, equals, text = (part.strip() for part in change.partition("="))
        if not equals or field not in kinds:
            raise ValueError(f"{change!r} in {spec!r} is not field=value with one of the "
                             f"fields {', '.join(kinds)}")
        if field in values:  # the last would win, under a label that shows both
            raise ValueError(f"{field} is set twice in {spec!r}; keep one")
        values[field] = _field_value(field, kinds[field], text)
    return replace(config, **values)


def _field_value(field: str, kind: str, text: str):
    """``text`` as the type of an ``OptimizationConfig`` field (annotations are strings)."""
    if "None" in kind and text.lower() == "none":
        return None
    if kind == "bool":
        words = {"true": True, "on": True, "1": True, "false": False, "off": False, "0": False}
        if text.lower() not in words:
            raise ValueError(f"{field} must be true or false (got {text!r})")
        return words[text.lower()]
    for number in (int, float):
        if kind.startswith(number.__name__):
            try:
                return number(text)
            except ValueError:
                wanted = "a whole number" if number is int else "a number"
                raise ValueError(f"{field} must be {wanted} (got {text!r})") from None
    return text
