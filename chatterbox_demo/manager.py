"""The one model manager per process.

The UI, the CLI and (later) the HTTP API all go through :class:`ModelManager`: it owns the
loaded model, the voice library and the active optimization configuration, and one lock
keeps one generation (or voice computation, or switch) on the model at a time. Never one
model per browser session.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from chatterbox.tts import Conditionals

from . import finetune, longform, pipeline, speaker_data, weights
from .config import (
    BASELINE,
    MAX_LONG_TEXT_CHARS,
    MAX_TEXT_CHARS,
    PRESETS,
    GenerationParams,
    OptimizationConfig,
    default_max_new_tokens,
    device_preset,
    get_preset,
    preset_name,
)
from .optimizations import (
    Calibration,
    apply_runtime_settings,
    build_s3gen,
    build_t3,
    record_estimator_calls,
    s3gen_variant_key,
    t3_variant_key,
    unavailable_reason,
)
from .voices import BUILTIN_NAME, Voice, VoiceLibrary, name_key, names_on_disk, unknown_voice

log = logging.getLogger(__name__)

SHIPPED_VOICES = Path(__file__).resolve().parent.parent / "voices"
DEFAULT_CACHE = Path.home() / ".cache" / "chatterbox-demo"
DEVICES = ("auto", "cuda", "mps", "cpu")
# Built variants kept per component (T3, S3Gen) besides the pristine fp32 ones. A full-size
# fp32 T3 copy is 2.1 GB, int8 0.6 GB; three of each fit the 24 GB this project targets.
MAX_VARIANTS = 3
# Notices kept for the UI (which shows the last few): a long-running server would otherwise
# keep one per eviction or failed build for its whole life.
MAX_NOTICES = 20

Progress = Callable[[float, str], None]


class TextError(ValueError):
    """Text the model cannot speak; the message says what to change."""


class OutOfMemory(ValueError):
    """A model variant did not fit; the active configuration is unchanged."""


# What running out of memory raises: MemoryError on a CPU, torch's OutOfMemoryError on a
# GPU (a RuntimeError subclass; older torch names it torch.cuda.OutOfMemoryError).
MEMORY_ERRORS = (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))
# ...but torch's own CPU (and MPS) allocators raise a plain RuntimeError, known only by its
# message: "DefaultCPUAllocator: can't allocate memory", "MPS backend out of memory".
MEMORY_MESSAGES = ("can't allocate memory", "out of memory")


# A variant key holding one of these already has smaller weights than fp32's: suggesting
# them after it ran out of memory would send the user in a circle.
SMALLER_WEIGHTS = {"int8-dynamic", "int8-weight-only", "int8-static", "bf16", "fp16"}


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out, rather than some other failure."""
    if isinstance(exc, MEMORY_ERRORS):
        return True
    return isinstance(exc, RuntimeError) and any(words in str(exc)
                                                 for words in MEMORY_MESSAGES)


@dataclass
class Synthesis:
    wav: np.ndarray
    sample_rate: int
    report: dict = field(default_factory=dict)
    speech_tokens: list[int] = field(default_factory=list)


@dataclass
class StreamChunk:
    """Audio ready to play, from text chunk ``chunk`` (1-based) of ``chunks``; the last
    one of a stream also carries the whole result."""
    wav: np.ndarray
    sample_rate: int
    chunk: int = 1
    chunks: int = 1
    synthesis: Synthesis | None = None


def pick_device(name: str = "auto") -> str:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; an explicit choice is checked."""
    name = (name or "auto").strip().lower()
    if name not in DEVICES:
        raise ValueError(f"Unknown device {name!r}; available: {', '.join(DEVICES)}")
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if (name == "cuda" and not cuda) or (name == "mps" and not mps):
        raise ValueError(f"Device {name!r} is not available here; use cpu or auto.")
    return name


def check_text(text, limit: int = MAX_TEXT_CHARS) -> str:
    """Refuse text the model cannot speak, with a message that says why."""
    if not isinstance(text, str):
        raise TextError("Text must be a string.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise TextError("Text contains invalid characters (unpaired surrogates).") from None
    # Control characters would reach the tokenizer as unknown tokens; a space is harmless.
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text).strip()
    if not text:
        raise TextError("Enter some text to speak.")
    if len(text) > limit:
        raise TextError(
            f"Text is {len(text)} characters; the limit is {limit}. "
            "Shorten it or split it into several generations."
        )
    if not any(ch.isalnum() for ch in text):
        raise TextError("Text has nothing to speak: it needs letters or digits.")
    return text


class ModelManager:
    """Owns the model, the voices and the settings; everything runs under ``self.lock``."""

    _instance: ModelManager | None = None
    _instance_lock = threading.Lock()

    def __init__(self, weights_spec: str = "auto", device: str = "auto",
                 cache_dir: str | os.PathLike | None = None,
                 shipped_voices: Path | None = SHIPPED_VOICES, seed: int = 0,
                 prepare_preset: bool = True):
        """``prepare_preset``: whether loading builds the device's preset, for a page that
        starts on it. The CLI says no: it applies the preset it runs (or builds it at the
        first generation), and a variant built for nothing costs time and memory."""
        weights.parse_source(weights_spec)  # fail early on a typo, before any loading
        self.weights_spec = weights_spec
        self.device = pick_device(device)
        self.cache_dir = Path(cache_dir) if cache_dir else DEFAULT_CACHE
        self.shipped_voices = shipped_voices
        self.seed = seed
        self.prepare_preset = prepare_preset
        self.lock = threading.RLock()
        self.loaded: weights.LoadedWeights | None = None
        self._library: VoiceLibrary | None = None
        self._ready = False  # loaded, and the start preset prepared: load() returns at once
        # The fastest preset that keeps upstream semantics on this device; applied (and
        # its variant built) when the model loads.
        self.preset = device_preset(self.device)
        self.config: OptimizationConfig = get_preset(self.preset)
        # What the API speaks with (unless a request names a preset): the page switches
        # self.config for everyone, and the same API request must give the same audio.
        # Baseline when the start preset could not be built.
        self.start_config = self.config
        # Built model variants, least recently used first: key -> module.
        self._t3_variants: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
        self._s3gen_variants: OrderedDict[tuple, torch.nn.Module] = OrderedDict()
        self.notices: list[str] = []  # things the UI should say (evictions, fallbacks)
        self._warmed: set[OptimizationConfig] = set()  # compiling ones already run once
        self.last_apply_s = 0.0  # build plus warm-up time of the last switch

    # --- the process-wide instance ------------------------------------------------------

    @classmethod
    def instance(cls) -> ModelManager:
        """The process-wide manager, configured from the environment on first use."""
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls(
                    weights_spec=os.environ.get("CHATTERBOX_WEIGHTS", "auto"),
                    device=os.environ.get("CHATTERBOX_DEVICE", "auto"),
                    cache_dir=os.environ.get("CHATTERBOX_DEMO_CACHE") or None,
                )
            return cls._instance

    @classmethod
    def configure(cls, **kwargs) -> ModelManager:
        """Replace the process-wide manager (the CLI does this from its flags)."""
        with cls._instance_lock:
            cls._instance = cls(**kwargs)
            return cls._instance

    # --- loading ------------------------------------------------------------------------

    def load(self, progress: Progress | None = None) -> weights.LoadedWeights:
        """Load the weights and the voice library once; later calls return at once."""
        loaded = self.loaded
        if loaded is not None and self._ready:
            # Loaded: no need to wait for the lock, which a generation holds throughout.
            # Not before the start preset is prepared: a page opened meanwhile read the
            # placeholder baseline as the preset, and its first generation switched to it.
            return loaded
        progress = progress or (lambda fraction, message: None)
        with self.lock:
            if self.loaded is not None:
                return self.loaded
            progress(0.05, f"Loading weights ({self.weights_spec}) on {self.device}")
            started = time.perf_counter()
            loaded = weights.load(self.weights_spec, self.device, self.seed)
            log.info("Loaded %s weights on %s in %.1f s", loaded.source, self.device,
                     time.perf_counter() - started)
            if loaded.banner:
                log.warning(loaded.banner)
            self.loaded = loaded  # the library computes the voices' conditionals with it
            try:
                library = VoiceLibrary(self.cache_dir, loaded.identity,
                                       self._compute_conditionals, self.device)
                library.register_builtin(loaded.tts.conds)
                if self.shipped_voices and self.shipped_voices.is_dir():
                    progress(0.7, "Preparing the shipped voices")
                    library.register_shipped(self.shipped_voices)
            except BaseException:
                # Not loaded after all: the next load() starts over rather than return at
                # once into a manager without a voice library.
                self.loaded = None
                raise
            self._library = library
            if self.prepare_preset:
                self._prepare_start_preset(progress)
            self._ready = True
            progress(1.0, "Ready")
            return loaded

    def _prepare_start_preset(self, progress: Progress) -> None:
        target, target_config = self.preset, self.config
        # Baseline until the target is built: what runs, and what a message about a
        # failed build says it stays on, should it fail.
        self.preset, self.config = "baseline", BASELINE
        progress(0.9, f"Preparing the {target} preset")
        try:
            self.apply(target_config, target)
        except Exception as exc:  # the model still works on the stock path
            self.start_config = BASELINE
            log.warning("Preset %s failed to build (%s); using baseline", target, exc)
            self._notify(f"{target} could not be built here ({exc}); started on baseline")

    @property
    def library(self) -> VoiceLibrary:
        self.load()
        return self._library

    def _compute_conditionals(self, path: Path, exaggeration: float) -> Conditionals:
        """The package's own ``prepare_conditionals``, without disturbing ``tts.conds``
        (the built-in voice lives there)."""
        tts = self.loaded.tts
        previous = tts.conds
        try:
            tts.prepare_conditionals(str(path), exaggeration=exaggeration)
            return tts.conds
        finally:
            tts.conds = previous

    def status(self) -> dict:
        loaded = self.loaded
        return {
            "weights": loaded.source if loaded else self.weights_spec,
            "weights_identity": loaded.identity if loaded else None,
            "device": self.device,
            "preset": self.preset,
            "banner": loaded.banner if loaded else None,
        }

    # --- configuration --------------------------------------------------------------------

    def unavailable_presets(self) -> dict[str, str]:
        """Preset name -> why it cannot run on this device, for those that cannot."""
        reasons = {name: unavailable_reason(config, self.device)
                   for name, config in PRESETS.items()}
        return {name: reason for name, reason in reasons.items() if reason}

    def apply_preset(self, name: str) -> OptimizationConfig:
        return self.apply(get_preset(name), name)

    def apply(self, config: OptimizationConfig, name: str | None = None) -> OptimizationConfig:
        """Make ``config`` the active configuration, building its model variant from the
        pristine fp32 weights (never from the checkpoint on disk; int8-static loads its
        compiled estimator's kept package) if it is not cached. Voices are untouched.
        Runs under the lock: a generation never sees a half-built variant."""
        reason = unavailable_reason(config, self.device)
        if reason:
            raise ValueError(f"This configuration cannot run on {self.device}: {reason}. "
                             f"{device_preset(self.device)} runs here.")
        with self.lock:
            self.load()
            started = time.perf_counter()
            keys = self._variant_keys(config, None)
            label = name or preset_name(config)
            with self._dropped_if_out_of_memory(self._not_built(keys), keys,
                                                f"warm up {label}"):
                self.variant(config)
                if config.compiles and config not in self._warmed:
                    # torch.compile compiles on first call: pay that here, not in a user's
                    # first generation, and report it apart. Per whole configuration, not
                    # per variant key: the decoder, the voice prefix, CUDA graphs and the
                    # CFM's batch change what gets compiled as much as the weights do.
                    self._warm_up(config)
                    self._warmed.add(config)
            self.last_apply_s = time.perf_counter() - started
            self.preset = name or self._preset_name(config)
            self.config = config
        return config

    def _warm_up(self, config: OptimizationConfig) -> None:
        voice = self._default_voice()
        self.generate("Warming up.", voice, GenerationParams(max_new_tokens=8), config,
                      ignore_stop=True)

    def variant(self, config: OptimizationConfig,
                adapter: str | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The (t3, s3gen) pair ``config`` runs on, built and cached on first use. With a
        fine-tuned voice's ``adapter`` directory, T3 is built from the pristine weights
        with the adapter merged in (a copy: the pristine T3 never changes, so switching
        back to any other voice is exact)."""
        with self.lock:
            tts = self.load().tts
            t3_key, s3gen_key = keys = self._variant_keys(config, adapter)
            fresh = self._not_built(keys)
            # Both parts are built before either is cached or anything is dropped: when
            # S3Gen runs out of memory, the cache (and the active configuration's
            # variants in it) stays exactly as it was.
            t3 = self._t3_variants.get(t3_key)
            if t3 is None:
                t3 = self._build("T3", t3_key,
                                 lambda: build_t3(self.t3_base(adapter), config))
            s3gen = self._s3gen_variants.get(s3gen_key)
            if s3gen is None:
                s3gen = self._build(
                    "S3Gen", s3gen_key,
                    lambda: build_s3gen(tts.s3gen, config, self._estimator_calibration,
                                        self.cache_dir / "compiled"))
            self._keep(self._t3_variants, "T3", t3_key, t3, tts.t3)
            self._keep(self._s3gen_variants, "S3Gen", s3gen_key, s3gen, tts.s3gen)
            apply_runtime_settings(config, self.device)  # only once both parts exist
            # Part of building: a traced decode step is recorded here, outside any timing.
            with self._dropped_if_out_of_memory(
                    fresh, keys, f"record the decode step of the T3 variant {_label(t3_key)}"):
                pipeline.prepare_decoder(t3, config)
            return t3, s3gen

    def _not_built(self, keys: tuple[tuple, tuple]) -> list[tuple[OrderedDict, tuple]]:
        """(cache, key) for each of the (T3, S3Gen) variant ``keys`` not built yet."""
        caches = (self._t3_variants, self._s3gen_variants)
        return [(cache, key) for cache, key in zip(caches, keys, strict=True)
                if key not in cache]

    @contextmanager
    def _dropped_if_out_of_memory(self, fresh: list[tuple[OrderedDict, tuple]],
                                  keys: tuple[tuple, tuple], doing: str):
        """Memory running out once the variants (``keys``) are built, recording the decode
        step or warming up a compiled preset, is handled as while building them: those
        just built (``fresh``) are dropped again, nothing is switched, and the notices say
        so. Building's own OutOfMemory passes through."""
        try:
            yield
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            for cache, key in fresh:
                cache.pop(key, None)
            raise self._out_of_memory(doing, exc, keys) from None

    def _estimator_calibration(self) -> Calibration:
        """What int8-static calibrates its activation scales on: the CFM estimator calls
        of one upstream S3Gen pass (fp32, 10 steps with CFG) over the default voice's own
        prompt tokens, real speech tokens and the conditioning every generation with that
        voice gets. Its source is that voice's conditionals; the pass runs only when no
        compiled package is kept for them."""
        tts = self.loaded.tts
        conds, _ = self._library.conditionals(self._library.get(self._default_voice()))
        ref = {name: value.to(self.device) if torch.is_tensor(value) else value
               for name, value in conds.gen.items()}

        def record() -> list[dict]:
            # The CFM's noise from a fixed seed, apart from the process's random state:
            # the calls must follow from the conditionals alone, which name the package.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                return record_estimator_calls(
                    tts.s3gen, lambda: tts.s3gen.flow_inference(
                        ref["prompt_token"], ref_dict=ref, finalize=True))

        return Calibration(source=ref, record=record)

    @staticmethod
    def _variant_keys(config: OptimizationConfig, adapter: str | None) -> tuple[tuple, tuple]:
        t3_key = t3_variant_key(config)
        return ((*t3_key, adapter) if adapter else t3_key), s3gen_variant_key(config)

    def variants_fit(self, runs: list[tuple[OptimizationConfig, str | None]]) -> bool:
        """Whether the variants these (configuration, voice) pairs run on can all stay
        built at once, so that taking turns between them never rebuilds one."""
        keys = [self._variant_keys(config, self.adapter_of(voice)) for config, voice in runs]
        pristine = self._variant_keys(BASELINE, None)  # kept apart from the bound
        return all(len({pair[part] for pair in keys} - {pristine[part]}) <= MAX_VARIANTS
                   for part in (0, 1))

    def t3_base(self, adapter: str | None) -> torch.nn.Module:
        """The fp32 T3 variants are derived from: the pristine one, or a fine-tuned copy."""
        tts = self.loaded.tts
        if adapter is None:
            return tts.t3
        return finetune.adapted_t3(tts.t3, Path(adapter), self.loaded.identity) or tts.t3

    def adapter_of(self, voice: str | None) -> str | None:
        """The adapter directory of a fine-tuned voice whose weights differ from the base
        (LoRA, full); None for every other voice."""
        chosen = self._library.get(voice if voice else self._default_voice())
        return chosen.adapter if chosen.method in ("lora", "full") else None

    def _build(self, label: str, key: tuple, build) -> torch.nn.Module:
        started = time.perf_counter()
        try:
            built = build()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            # Nothing was cached or switched: the manager stays on what it ran before.
            raise self._out_of_memory(f"build the {label} variant {_label(key)}", exc,
                                      [key]) from None
        log.info("Built %s variant %s in %.1f s", label, key, time.perf_counter() - started)
        return built

    def _out_of_memory(self, doing: str, exc: Exception, keys: list[tuple]) -> OutOfMemory:
        """The error (and the page's notice) for memory running out, suggesting smaller
        weights unless the variants ``keys`` name have them already."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        smaller = "" if any(SMALLER_WEIGHTS & set(key) for key in keys) else \
            " Or try a preset with int8 or bf16 weights."
        message = (f"Not enough memory to {doing} ({type(exc).__name__}); staying on "
                   f"{self.preset}. Free memory and try again.{smaller}")
        self._notify(message)
        log.warning(message)
        return OutOfMemory(message)

    def _keep(self, cache: OrderedDict, label: str, key: tuple, module: torch.nn.Module,
              pristine: torch.nn.Module) -> None:
        """Cache ``module`` as the most recently used, and drop the least recently used
        copies past MAX_VARIANTS. The pristine module is cached too but neither counted
        nor dropped: it is the loaded model itself, so dropping it would free nothing."""
        cache[key] = module
        cache.move_to_end(key)
        copies = [k for k, built in cache.items() if built is not pristine]
        for old_key in copies[:-MAX_VARIANTS]:  # the one just used is last: never dropped
            del cache[old_key]
            self._warmed.clear()  # a rebuilt variant compiles again: warm it up again
            self._notify(f"{label} variant {_label(old_key)} was dropped to bound memory; "
                         "using it again rebuilds it")
            log.info(self.notices[-1])

    def _notify(self, message: str) -> None:
        """Something the UI should say; only the latest MAX_NOTICES are kept."""
        self.notices.append(message)
        del self.notices[:-MAX_NOTICES]

    # --- voices ---------------------------------------------------------------------------

    def check_voice(self, name: str) -> None:
        """Refuse a name no voice has. Before the model is loaded, from the library's files,
        so that a typo costs no loading (nor a preset's build); a name they cannot settle
        (the voice inside the weights, an index unreadable now) is left to the library."""
        if self._library is not None:
            self._library.get(name)
            return
        names = names_on_disk(self.cache_dir, self.shipped_voices)
        if names is None or name_key(name) == name_key(BUILTIN_NAME):
            return
        if name_key(name) not in {name_key(known) for known in names}:
            raise unknown_voice(name, names)

    def list_voices(self) -> list[Voice]:
        # Without the model's lock: the library keeps itself consistent, and a list should
        # not wait for a running generation.
        return self.library.list()

    def add_voice(self, name: str, audio, exaggeration: float = 0.5) -> Voice:
        with self.lock:
            return self.library.add(name, audio, exaggeration)

    def remove_voice(self, name: str) -> Voice:
        with self.lock:
            return self.library.remove(name)

    def rename_voice(self, old: str, new: str) -> Voice:
        with self.lock:
            return self.library.rename(old, new)

    # --- synthesis ------------------------------------------------------------------------

    def generate(self, text: str, voice: str | None = None,
                 params: GenerationParams | None = None,
                 config: OptimizationConfig | None = None,
                 voice_file: str | os.PathLike | None = None,
                 ignore_stop: bool = False) -> Synthesis:
        """Speak ``text`` in ``voice`` (a library name) or the clip at ``voice_file``.

        ``voice_file`` is for trusted callers (the CLI); the UI and API pass names only.
        """
        text = check_text(text)
        params = params or GenerationParams()
        with self.lock:
            loaded = self.load()
            config = config or self.config
            build_started = time.perf_counter()
            adapter = None if voice_file is not None else self.adapter_of(voice)
            t3, s3gen = self.variant(config, adapter)  # built outside the timed region
            build_s = time.perf_counter() - build_started
            started = time.perf_counter()
            conds, voice_info, exaggeration = self._voice_conditionals(voice, voice_file,
                                                                       params, config)
            conditioning_s = time.perf_counter() - started
            max_new_tokens = params.max_new_tokens or default_max_new_tokens(text)
            stages = pipeline.run(loaded.tts, text, conds, exaggeration, params, max_new_tokens,
                                  config, t3=t3, s3gen=s3gen, ignore_stop=ignore_stop)
            total_s = time.perf_counter() - started
            # Named under the lock: a switch right after it would name this run's
            # configuration after the one switched to.
            preset = self._preset_name(config)
        timings = {"conditioning_s": conditioning_s, "t3_s": stages.t3_s,
                   "t3_tokens": stages.t3_tokens, "s3gen_s": stages.s3gen_s,
                   "watermark_s": stages.watermark_s, "total_s": total_s, "build_s": build_s}
        report = self._report(preset, voice_info, timings, len(stages.wav),
                              {**asdict(params), "exaggeration": exaggeration,
                               "max_new_tokens": max_new_tokens})
        return Synthesis(stages.wav, stages.sample_rate, report, stages.speech_tokens)

    def _voice_conditionals(self, voice: str | None, voice_file, params: GenerationParams,
                            config: OptimizationConfig) -> tuple[Conditionals, dict, float]:
        """(conditionals, {"name", "source"}, exaggeration) for a library voice or a clip."""
        library = self._library
        if voice_file is not None:
            exaggeration = 0.5 if params.exaggeration is None else params.exaggeration
            conds, source = library.conditionals_for_file(
                Path(voice_file), exaggeration, cached=config.cached_conditionals)
            return conds, {"name": Path(voice_file).name, "source": source}, exaggeration
        chosen = library.get(voice if voice else self._default_voice())
        exaggeration = (chosen.exaggeration if params.exaggeration is None
                        else params.exaggeration)
        conds, source = library.conditionals(chosen, cached=config.cached_conditionals)
        info = {"name": chosen.name, "source": source}
        if chosen.kind == "finetuned":
            info["finetuned"] = chosen.method
        return conds, info, exaggeration

    def _report(self, preset: str, voice_info: dict, timings: dict, samples: int,
                params: dict) -> dict:
        """What one generation did and how long each stage took (seconds, 4 decimals)."""
        loaded = self.loaded
        audio_seconds = samples / loaded.tts.sr
        timings = {key: value if key == "t3_tokens" else round(value, 4)
                   for key, value in timings.items()}
        timings["t3_tokens_per_s"] = (round(timings["t3_tokens"] / timings["t3_s"], 2)
                                      if timings["t3_s"] > 0 else None)
        return {
            "audio_seconds": round(audio_seconds, 3),
            "sample_rate": loaded.tts.sr,
            "weights": loaded.source,
            "weights_identity": loaded.identity,
            "device": self.device,
            "preset": preset,
            "voice": voice_info,
            "timings": timings,  # build_s: variant build/warm-up, apart from the rest
            "rtf": round(timings["total_s"] / audio_seconds, 3) if audio_seconds else None,
            "params": params,
        }

    def generate_long(self, text: str, voice: str | None = None,
                      params: GenerationParams | None = None,
                      config: OptimizationConfig | None = None,
                      progress: Progress | None = None,
                      voice_file: str | os.PathLike | None = None) -> Synthesis:
        """Speak text of any length up to MAX_LONG_TEXT_CHARS: sentence chunks
        (longform.chunk_text), one generation each with the voice's conditionals computed
        at most once, joined with equal-power crossfades. Chunk i uses seed + i, so the same
        seed gives the same audio. ``params.max_new_tokens`` bounds each chunk. Text that
        fits one chunk is a plain :meth:`generate`. ``voice_file`` as in :meth:`generate`."""
        if isinstance(text, str) and len(text) <= longform.CHUNK_CHARS:
            return self.generate(text, voice, params, config, voice_file=voice_file)
        text = check_text(text, MAX_LONG_TEXT_CHARS)
        params = params or GenerationParams()
        chunks = longform.chunk_text(text)
        with self.lock:  # one configuration for every chunk: no switch in between
            config = config or self.config
            name = self._preset_name(config)
            results = [self.generate(chunk, voice, chunk_params, chunk_config,
                                     voice_file=voice_file)
                       for _, chunk, chunk_params, chunk_config
                       in _chunk_runs(chunks, params, config, progress)]
        sample_rate = results[0].sample_rate
        wav = longform.crossfade_join([r.wav for r in results], sample_rate)
        report = dict(results[0].report)
        report["preset"] = name
        timings = {key: round(sum(r.report["timings"][key] for r in results), 4)
                   for key in results[0].report["timings"] if key != "t3_tokens_per_s"}
        timings["t3_tokens"] = int(timings["t3_tokens"])
        timings["t3_tokens_per_s"] = (round(timings["t3_tokens"] / timings["t3_s"], 2)
                                      if timings["t3_s"] else None)
        report["timings"] = timings
        report["audio_seconds"] = round(len(wav) / sample_rate, 3)
        report["rtf"] = (round(timings["total_s"] / report["audio_seconds"], 3)
                         if report["audio_seconds"] else None)
        report["chunks"] = [{"text": chunk, "audio_seconds": r.report["audio_seconds"],
                             "samples": len(r.wav),
                             "t3_tokens": r.report["timings"]["t3_tokens"]}
                            for chunk, r in zip(chunks, results, strict=True)]
        tokens = [t for r in results for t in r.speech_tokens]
        return Synthesis(wav, sample_rate, report, tokens)

    def stream(self, text: str, voice: str | None = None,
               params: GenerationParams | None = None,
               config: OptimizationConfig | None = None,
               progress: Progress | None = None, ignore_stop: bool = False):
        """Speak ``text`` (up to MAX_LONG_TEXT_CHARS) as it is made: yields
        :class:`StreamChunk` audio ready to play, the last one carrying the whole
        :class:`Synthesis` with a report that adds ``first_audio_s`` (time to the first
        playable audio). Long text goes chunk by chunk as in :meth:`generate_long`; each
        chunk is rendered in token blocks (pipeline.run_stream), all joined by crossfades.

        The generation runs in a thread of its own that holds the manager's lock: a web
        server may resume this generator from a different thread each time, and a lock
        must be released by the thread that took it. Abandoning the generator stops the
        generation at its next piece."""
        text = check_text(text, MAX_LONG_TEXT_CHARS)
        params = params or GenerationParams()
        pieces: queue.Queue = queue.Queue()
        stop = threading.Event()

        def produce():
            try:
                for chunk in self._stream(text, voice, params, config, progress, ignore_stop,
                                          stop):
                    pieces.put(chunk)
            except BaseException as exc:  # handed to the consumer, raised there
                pieces.put(exc)
            finally:
                pieces.put(None)

        threading.Thread(target=produce, name="chatterbox-stream", daemon=True).start()
        try:
            while (item := pieces.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()

    def _stream(self, text: str, voice: str | None, params: GenerationParams,
                config: OptimizationConfig | None, progress: Progress | None,
                ignore_stop: bool, stop: threading.Event):
        chunks = longform.chunk_text(text) if len(text) > longform.CHUNK_CHARS else [text]
        with self.lock:  # one configuration for the whole stream
            loaded = self.load()
            tts = loaded.tts
            config = config or self.config
            build_started = time.perf_counter()
            t3, s3gen = self.variant(config, self.adapter_of(voice))
            build_s = time.perf_counter() - build_started
            stitcher = longform.Stitcher(int(longform.CROSSFADE_S * tts.sr))
            started = time.perf_counter()
            timings = dict.fromkeys(("conditioning_s", "t3_s", "s3gen_s", "watermark_s"), 0.0)
            timings["t3_tokens"] = 0
            first_audio_s, played, tokens, chunk_reports, timeline = None, [], [], [], []
            for index, chunk, chunk_params, chunk_config in _chunk_runs(chunks, params, config,
                                                                        progress):
                conditioning_started = time.perf_counter()
                conds, voice_info, exaggeration = self._voice_conditionals(
                    voice, None, chunk_params, chunk_config)
                timings["conditioning_s"] += time.perf_counter() - conditioning_started
                max_new_tokens = params.max_new_tokens or default_max_new_tokens(chunk)
                chunk_samples = 0
                for piece in pipeline.run_stream(
                        tts, chunk, conds, exaggeration, chunk_params, max_new_tokens,
                        stitcher.overlap, config, t3=t3, s3gen=s3gen, ignore_stop=ignore_stop):
                    ready = stitcher.add(piece.wav, same_signal=piece.continues)
                    for key in ("t3_s", "s3gen_s", "watermark_s"):
                        timings[key] += getattr(piece, key)
                    tokens += piece.speech_tokens
                    # A continuing piece starts by re-rendering the overlap already counted.
                    chunk_samples += len(piece.wav) - (stitcher.overlap if piece.continues
                                                       else 0)
                    now = time.perf_counter() - started
                    if first_audio_s is None and len(ready):
                        first_audio_s = now
                    timeline.append({"at_s": round(now, 3), "tokens": len(piece.speech_tokens),
                                     "t3_s": round(piece.t3_s, 3),
                                     "s3gen_s": round(piece.s3gen_s, 3)})
                    played.append(ready)
                    yield StreamChunk(ready, tts.sr, index + 1, len(chunks))
                    if stop.is_set():
                        return
                timings["t3_tokens"] += piece.t3_tokens
                chunk_reports.append({"text": chunk, "t3_tokens": piece.t3_tokens,
                                      "samples": chunk_samples})
            tail = stitcher.finish()
            played.append(tail)
            timings["total_s"] = time.perf_counter() - started
            timings["build_s"] = build_s
            wav = np.concatenate(played)
            report = self._report(self._preset_name(config), voice_info, timings, len(wav),
                                  {**asdict(params), "exaggeration": exaggeration,
                                   "max_new_tokens": params.max_new_tokens or None})
            report["first_audio_s"] = round(first_audio_s, 4)
            report["streamed"] = True
            report["pieces"] = timeline  # when each piece was ready, and what it cost
            if len(chunks) > 1:
                report["chunks"] = chunk_reports
            yield StreamChunk(tail, tts.sr, len(chunks), len(chunks),
                              Synthesis(wav, tts.sr, report, tokens))

    # --- fine-tuning ----------------------------------------------------------------------

    def prepare_dataset(self, folder, progress: Progress | None = None):
        """Check and tokenize a speaker's folder (speaker_data.prepare) with this model."""
        with self.lock:
            loaded = self.load()
            return speaker_data.prepare(Path(folder), loaded.tts, loaded.identity, progress)

    def finetune(self, folder, out_dir, settings: finetune.TrainSettings,
                 progress: Callable | None = None, resume: bool = False) -> dict:
        """Fine-tune T3 on a speaker's folder into ``out_dir``; returns the card. Training
        runs on a copy and holds the model's lock only a step at a time (torch's random
        state is the process's: see finetune._RandomState), so generation goes on."""
        with self.lock:
            loaded = self.load()
            data = speaker_data.prepare(Path(folder), loaded.tts, loaded.identity)
            conds = self._compute_conditionals(Path(data.reference), settings.exaggeration)
        return finetune.train(loaded.tts.t3, conds, data, Path(out_dir), settings,
                              loaded.identity, progress, resume, lock=self.lock)

    def add_finetuned_voice(self, name: str, adapter_dir, exaggeration: float = 0.5, *,
                            next_free_name: bool = False) -> Voice:
        """List an adapter directory as a voice, after checking it fits these weights
        (``next_free_name``: see ``VoiceLibrary.add_finetuned``)."""
        with self.lock:
            loaded = self.load()
            finetune.check_fits(Path(adapter_dir), loaded.tts.t3, loaded.identity)
            return self.library.add_finetuned(name, adapter_dir, loaded.identity,
                                              exaggeration, next_free_name=next_free_name)

    def _default_voice(self) -> str:
        names = self._library.names()
        if not names:
            raise ValueError("No voices yet: add one from a reference clip first.")
        return names[0]

    @property
    def start_preset(self) -> str:
        """The name of :attr:`start_config`: what a newly opened page offers, whatever the
        page's users have switched to since."""
        return preset_name(self.start_config)

    def _preset_name(self, config: OptimizationConfig) -> str:
        if config == self.config:
            return self.preset
        return preset_name(config)


def _chunk_runs(chunks: list[str], params: GenerationParams, config: OptimizationConfig,
                progress: Progress | None):
    """(index, chunk, its params, its config) for each chunk of a long text, reporting
    progress as each starts. Chunk i uses seed + i, so the same seed gives the same audio;
    conditionals come from the library after the first chunk, whatever the preset says:
    recomputing them per chunk would only repeat the same work."""
    later = replace(config, cached_conditionals=True)
    for index, chunk in enumerate(chunks):
        if progress:
            progress(index / len(chunks), f"chunk {index + 1} of {len(chunks)}")
        yield (index, chunk, replace(params, seed=(params.seed + index) % 2**32),
               later if index else config)


def _label(key: tuple) -> str:
    """A variant key for people: its settings, and the adapter's folder name when fine-tuned."""
    return "/".join(Path(part).name[:12] if "/" in part else part for part in key)
