"""A/B comparison: the same text, voice, seed and token budget under two configurations,
measured with the benchmark's own function, plus how far B's audio is from A's."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from . import fidelity, plots
from .bench import Measurement
from .config import (
    GenerationParams,
    OptimizationConfig,
    default_max_new_tokens,
    device_preset,
)
from .manager import ModelManager, Synthesis, check_text
from .optimizations import unavailable_reason

# (row key, label, higher is better) in display order; None: no ratio. A warm-up is a
# one-off cost, often a cache lookup on one side and minutes of compiling on the other:
# their ratio (0.0 when B compiles) is no speedup. Each row's ratio is taken so that above
# 1 means B did better (faster, more tokens/s, less memory): one header then fits them all.
FIGURES = (
    ("conditioning_s", "conditioning (s)", False),
    ("t3_s", "T3 (s)", False),
    ("s3gen_s", "S3Gen (s)", False),
    ("watermark_s", "watermark (s)", False),
    ("total_s", "total (s)", False),
    ("t3_tokens_per_s", "T3 tokens/s", True),
    ("rtf", "RTF", False),
    # The work each side did: the same token budget, but either may sample the stop token
    # sooner, and S3Gen renders only the speakable tokens. Where these differ, the times
    # above cover unequal work (the summary says so); RTF is per second of audio.
    ("t3_tokens", "T3 speech tokens", None),
    ("audio_seconds", "audio (s)", None),
    ("warmup_s", "warm-up (s)", None),
    ("t3_weights_mb", "T3 weights (MB)", False),
    # The process's: it holds every variant kept built, both sides' among them, so it
    # reads alike for A and B and its ratio would say nothing.
    ("peak_mem_mb", "process peak memory (MB)", None),
)
# The table's columns: figure, A, B, and each row's ratio (see FIGURES).
TABLE_HEADERS = ["", "A", "B", "B's gain over A (x, >1: B better)"]
SAME_AUDIO_DB = 25.0  # mel SNR above which two renderings of the same tokens sound alike
# The log-mels compared are in dB below clip A's loudest mel bin, floored this far below
# it: a floor fixed in absolute power (plots.log_mel's 1e-5) made quieter clips score
# higher, since the "signal" was the distance from that fixed level.
MEL_FLOOR_DB = 80.0
# Under a millisecond a stage was skipped or served from memory (cached conditionals: about
# 0.1 ms at full size), and the rows' rounding to 0.1 ms leaves at most one digit of it: a
# ratio against it (22795x) would be mostly rounding.
SKIPPED_STAGE_S = 0.001


@dataclass
class Fidelity:
    """B's audio against A's."""

    mel_snr_db: float
    same_tokens: bool
    first_difference: int | None  # index of the first speech token that differs

    def reading(self) -> str:
        """One line on what the figure means for a listener."""
        if self.mel_snr_db == math.inf:
            return "B's audio is identical to A's."
        snr = f"{self.mel_snr_db:.1f} dB mel SNR"
        if self.same_tokens and self.mel_snr_db >= SAME_AUDIO_DB:
            return (f"Same speech tokens and {snr}: the two differ by rounding only; expect "
                    "no audible difference.")
        if self.same_tokens:
            return (f"Same speech tokens, but S3Gen renders them differently ({snr}): the "
                    "change alters the sound itself (fewer CFM steps, no CFG, a shorter "
                    "prompt or low precision); listen for it.")
        return (f"B sampled different speech tokens from token {self.first_difference} on: "
                "a numeric change flipped a sampling decision, so B says the same text with "
                f"different timing and prosody, and the {snr} says little about quality.")


def relative_log_mels(a: Synthesis, b: Synthesis) -> tuple[torch.Tensor, torch.Tensor]:
    """Both clips' mels in dB relative to A's peak mel power, floored MEL_FLOOR_DB below
    it: scaling both clips by one gain changes nothing."""
    power_a = plots.mel_power(a.wav, a.sample_rate)
    power_b = plots.mel_power(b.wav, b.sample_rate)
    # A silent A has no peak: B's then; both silent compare equal at the floor.
    peak = float(power_a.max()) or float(power_b.max()) or 1.0
    floor = peak * 10 ** (-MEL_FLOOR_DB / 10)
    return tuple(10 * torch.log10(p.double().clamp(min=floor) / peak)
                 for p in (power_a, power_b))


def audio_fidelity(a: Synthesis, b: Synthesis) -> Fidelity:
    snr = fidelity.snr_db(*relative_log_mels(a, b))
    tokens_a, tokens_b = a.speech_tokens, b.speech_tokens
    pairs = enumerate(zip(tokens_a, tokens_b, strict=False))
    first = next((i for i, (x, y) in pairs if x != y), None)
    if first is None and len(tokens_a) != len(tokens_b):
        first = min(len(tokens_a), len(tokens_b))
    return Fidelity(snr, first is None, first)


@dataclass
class Comparison:
    a: dict  # bench.Measurement rows
    b: dict | None = None  # None while B has not run yet
    runs: int = 1  # timed runs per side: fewer than asked when cancelled between turns

    @property
    def audio_a(self) -> Synthesis:
        return self.a["synthesis"]

    @property
    def audio_b(self) -> Synthesis | None:
        return self.b["synthesis"] if self.b else None

    @property
    def speedup(self) -> float | None:
        """How many times faster B ran end to end than A."""
        return _ratio(self.a["total_s"], self.b["total_s"]) if self.b else None

    @property
    def unequal_work(self) -> str | None:
        """What differed in the work the two sides did, in words; None when nothing did."""
        if not self.b:
            return None
        a, b = self.a, self.b
        keys = ("t3_tokens", "audio_seconds")
        if [a.get(key) for key in keys] == [b.get(key) for key in keys]:
            return None
        return (f"A decoded {a['t3_tokens']} speech tokens into {a['audio_seconds']:.2f} s of "
                f"audio, B {b['t3_tokens']} into {b['audio_seconds']:.2f} s")

    @functools.cached_property
    def fidelity(self) -> Fidelity | None:
        """Computed once (two mel spectrograms): the summary and the history both read it."""
        return audio_fidelity(self.audio_a, self.audio_b) if self.b else None

    def rows(self) -> list[list]:
        """Figure, A, B, B's gain over A (TABLE_HEADERS): the table the UI shows and the
        API returns."""
        table = []
        for key, label, higher_better in FIGURES:
            a, b = self.a.get(key), (self.b or {}).get(key)
            skipped = label.endswith("(s)") and min(a or 0.0, b or 0.0) < SKIPPED_STAGE_S
            if higher_better is None or skipped:
                speedup = None  # a one-off cost, or a stage one side skipped: no ratio
            else:
                speedup = _ratio(b, a) if higher_better else _ratio(a, b)
            table.append([label, a, b, "–" if speedup is None else speedup])
        return table

    def chart(self):
        sides = [("A", self.a)] + ([("B", self.b)] if self.b else [])
        return plots.stage_bars([label for label, _ in sides], [row for _, row in sides],
                                "seconds per stage")

    def spectrograms(self):
        clips = [("A", self.audio_a.wav, self.audio_a.sample_rate)]
        if self.b:
            clips.append(("B", self.audio_b.wav, self.audio_b.sample_rate))
        return plots.mel_figure(clips)


def _ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return round(numerator / denominator, 2)


Progress = Callable[[float, str], None]


def check_runnable(side: str, config: OptimizationConfig, device: str) -> None:
    """Refuse a side that cannot run on ``device``, naming the side and the reason."""
    reason = unavailable_reason(config, device)
    if reason:
        raise ValueError(f"Configuration {side} cannot run on {device}: {reason}. "
                         f"{device_preset(device)} runs here.")


def compare_steps(manager: ModelManager, text: str, voice: str | None,
                  params: GenerationParams, config_a: OptimizationConfig,
                  config_b: OptimizationConfig, repeats: int = 1,
                  progress: Progress | None = None,
                  cancelled: Callable[[], bool] = lambda: False) -> Iterator[Comparison]:
    """Warm A up and run it once, yield the comparison with A only; warm B up and run it
    once, then the other repeats in turns, B first (A B B A A B ...), and yield it whole.
    Stop before B, or before the next turn, when ``cancelled()`` says so. The token budget
    is fixed before either runs, even when ``params`` leaves it to be derived from the
    text; either side may still stop sooner (the stop token, as in real use), which the
    table's tokens and audio rows show and the summary names."""
    text = check_text(text)
    for side, config in (("A", config_a), ("B", config_b)):
        check_runnable(side, config, manager.device)
    if params.max_new_tokens is None:
        params = replace(params, max_new_tokens=default_max_new_tokens(text))
    report = progress or (lambda fraction, message: None)
    a = _first_run(manager, "A", 0.05, config_a, text, voice, params, report)
    yield Comparison(a.row())
    if cancelled():
        return
    b = _first_run(manager, "B", 0.5, config_b, text, voice, params, report)
    if repeats > 1:
        report(0.75, f"A and B in turns: {repeats - 1} more run(s) each")
    # Whichever side runs first in a pair can find the machine in another state (caches,
    # clocks): alternating the order spreads that over both sides.
    for turn in range(1, repeats):
        if cancelled():
            break
        for measurement in (b, a) if turn % 2 else (a, b):
            measurement.repeat()
    yield Comparison(a.row(), b.row(), runs=len(b.runs))


def _first_run(manager, side, fraction, config, text, voice, params, report) -> Measurement:
    # Both sides, compiled or not, are warmed up with one untimed run of this very
    # generation (Measurement's warm-up): the first call at a new audio length costs extra
    # (HiFT: 0.7 s against 0.02 s on the tiny model), and a side left cold paid it in its
    # timings (cached against cached, A cold: B 1.37x "faster").
    steps = "building, compiling and warming up the variant" if config.compiles else \
        "building and warming up the variant"
    report(fraction, f"{side}: {steps}, then a run")
    measurement = Measurement(manager, config, text, voice, params, warmup=True)
    measurement.repeat()
    return measurement


def compare(manager: ModelManager, text: str, voice: str | None, params: GenerationParams,
            config_a: OptimizationConfig, config_b: OptimizationConfig,
            repeats: int = 1) -> Comparison:
    """Run A then B (see :func:`compare_steps`); the finished comparison."""
    *_, done = compare_steps(manager, text, voice, params, config_a, config_b, repeats)
    return done
