"""A/B comparison: the same text, voice, seed and token budget under two configurations,
measured with the benchmark's own function, plus how far B's audio is from A's."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from . import fidelity, plots
from .bench import measure
from .config import GenerationParams, OptimizationConfig, default_max_new_tokens
from .manager import ModelManager, Synthesis, check_text
from .optimizations import unavailable_reason

# (row key, label, higher is better) in display order; None: no ratio. A warm-up is a
# one-off cost, often a cache lookup on one side and minutes of compiling on the other:
# their ratio (0.0 when B compiles) is no speedup.
FIGURES = (
    ("conditioning_s", "conditioning (s)", False),
    ("t3_s", "T3 (s)", False),
    ("s3gen_s", "S3Gen (s)", False),
    ("watermark_s", "watermark (s)", False),
    ("total_s", "total (s)", False),
    ("t3_tokens_per_s", "T3 tokens/s", True),
    ("rtf", "RTF", False),
    ("warmup_s", "warm-up (s)", None),
    ("peak_mem_mb", "peak memory (MB)", False),
)
SAME_AUDIO_DB = 25.0  # mel SNR above which two renderings of the same tokens sound alike
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
        if math.isinf(self.mel_snr_db):
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


def audio_fidelity(a: Synthesis, b: Synthesis) -> Fidelity:
    mel_a = plots.log_mel(a.wav, a.sample_rate)
    mel_b = plots.log_mel(b.wav, b.sample_rate)
    snr = fidelity.snr_db(torch.from_numpy(mel_a), torch.from_numpy(mel_b))
    tokens_a, tokens_b = a.speech_tokens, b.speech_tokens
    pairs = enumerate(zip(tokens_a, tokens_b, strict=False))
    first = next((i for i, (x, y) in pairs if x != y), None)
    if first is None and len(tokens_a) != len(tokens_b):
        first = min(len(tokens_a), len(tokens_b))
    return Fidelity(snr, first is None, first)


@dataclass
class Comparison:
    a: dict  # bench.measure rows
    b: dict | None = None  # None while B has not run yet

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

    @functools.cached_property
    def fidelity(self) -> Fidelity | None:
        """Computed once (two mel spectrograms): the summary and the history both read it."""
        return audio_fidelity(self.audio_a, self.audio_b) if self.b else None

    def rows(self) -> list[list]:
        """Figure, A, B, B's speedup over A: the table the UI shows and the API returns."""
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
        raise ValueError(f"Configuration {side} cannot run on {device}: {reason}")


def compare_steps(manager: ModelManager, text: str, voice: str | None,
                  params: GenerationParams, config_a: OptimizationConfig,
                  config_b: OptimizationConfig, repeats: int = 1,
                  progress: Progress | None = None,
                  cancelled: Callable[[], bool] = lambda: False) -> Iterator[Comparison]:
    """Run A, yield the comparison with A only, run B, yield it whole; stop before B when
    ``cancelled()`` says so. The token budget is fixed before either runs, so both sides
    do the same amount of work even when ``params`` leaves it to be derived from the
    text."""
    text = check_text(text)
    for side, config in (("A", config_a), ("B", config_b)):
        check_runnable(side, config, manager.device)
    if params.max_new_tokens is None:
        params = replace(params, max_new_tokens=default_max_new_tokens(text))
    report = progress or (lambda fraction, message: None)
    a = _measure_side(manager, "A", 0.05, config_a, text, voice, params, repeats, report)
    yield Comparison(a)
    if cancelled():
        return
    b = _measure_side(manager, "B", 0.5, config_b, text, voice, params, repeats, report)
    yield Comparison(a, b)


def _measure_side(manager, side, fraction, config, text, voice, params, repeats, report):
    # A compiled variant compiles on its first call: warm it up first so that lands in
    # the warm-up row, not in the timings.
    compiled = config.compiles
    steps = "building, compiling and warming up the variant" if compiled else \
        "building the variant"
    report(fraction, f"{side}: {steps}, then {repeats} run(s)")
    return measure(manager, config, text, voice, params, repeats, warmup=compiled)


def compare(manager: ModelManager, text: str, voice: str | None, params: GenerationParams,
            config_a: OptimizationConfig, config_b: OptimizationConfig,
            repeats: int = 1) -> Comparison:
    """Run A then B; the finished comparison."""
    *_, done = compare_steps(manager, text, voice, params, config_a, config_b, repeats)
    return done
