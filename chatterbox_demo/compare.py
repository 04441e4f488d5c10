"""A/B comparison: the same text, voice, seed and token budget under two configurations,
measured with the benchmark's own function."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .bench import measure
from .config import GenerationParams, OptimizationConfig, default_max_new_tokens
from .manager import ModelManager, Synthesis, check_text

# (row key, label, higher is better) in display order.
FIGURES = (
    ("conditioning_s", "conditioning (s)", False),
    ("t3_s", "T3 (s)", False),
    ("s3gen_s", "S3Gen (s)", False),
    ("watermark_s", "watermark (s)", False),
    ("total_s", "total (s)", False),
    ("t3_tokens_per_s", "T3 tokens/s", True),
    ("rtf", "RTF", False),
    ("warmup_s", "warm-up (s)", False),
    ("peak_mem_mb", "peak memory (MB)", False),
)


@dataclass
class Comparison:
    a: dict  # bench.measure rows
    b: dict

    @property
    def audio_a(self) -> Synthesis:
        return self.a["synthesis"]

    @property
    def audio_b(self) -> Synthesis:
        return self.b["synthesis"]

    @property
    def speedup(self) -> float | None:
        """How many times faster B ran end to end than A."""
        return _ratio(self.a["total_s"], self.b["total_s"])

    def rows(self) -> list[list]:
        """Figure, A, B, B's speedup over A: the table the UI shows and the API returns."""
        table = []
        for key, label, higher_better in FIGURES:
            a, b = self.a.get(key), self.b.get(key)
            speedup = _ratio(b, a) if higher_better else _ratio(a, b)
            # A zero on either side (a stage B skipped entirely) has no meaningful ratio.
            table.append([label, a, b, "–" if speedup is None else speedup])
        return table


def _ratio(numerator, denominator) -> float | None:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return round(numerator / denominator, 2)


def compare(manager: ModelManager, text: str, voice: str | None, params: GenerationParams,
            config_a: OptimizationConfig, config_b: OptimizationConfig,
            repeats: int = 1) -> Comparison:
    """Run A then B. The token budget is fixed before either runs, so both sides do the
    same amount of work even when ``params`` leaves it to be derived from the text."""
    text = check_text(text)
    if params.max_new_tokens is None:
        params = replace(params, max_new_tokens=default_max_new_tokens(text))
    a = measure(manager, config_a, text, voice, params, repeats, warmup=False)
    b = measure(manager, config_b, text, voice, params, repeats, warmup=False)
    return Comparison(a, b)
