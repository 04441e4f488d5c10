"""A/B comparison: the same text, voice, seed and token budget under two configurations."""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import GenerationParams, OptimizationConfig, default_max_new_tokens
from .manager import ModelManager, Synthesis, check_text

# (report key, label) in display order; the speedup column is A's time over B's.
STAGES = (
    ("conditioning_s", "conditioning (s)"),
    ("t3_s", "T3 (s)"),
    ("s3gen_s", "S3Gen (s)"),
    ("watermark_s", "watermark (s)"),
    ("total_s", "total (s)"),
)


@dataclass
class Comparison:
    a: Synthesis
    b: Synthesis

    @property
    def speedup(self) -> float | None:
        """How many times faster B ran end to end than A."""
        b_total = self.b.report["timings"]["total_s"]
        return self.a.report["timings"]["total_s"] / b_total if b_total > 0 else None

    def rows(self) -> list[list]:
        """Stage, A, B, speedup rows: the table the UI shows and the API returns."""
        ta, tb = self.a.report["timings"], self.b.report["timings"]
        rows = [[label, ta[key], tb[key], _ratio(ta[key], tb[key])] for key, label in STAGES]
        rows.append(["T3 tokens/s", ta["t3_tokens_per_s"], tb["t3_tokens_per_s"],
                     _ratio(tb["t3_tokens_per_s"], ta["t3_tokens_per_s"])])
        rows.append(["RTF", self.a.report["rtf"], self.b.report["rtf"],
                     _ratio(self.a.report["rtf"], self.b.report["rtf"])])
        return rows


def _ratio(slow, fast) -> float | None:
    if slow is None or fast is None or fast <= 0:
        return None
    return round(slow / fast, 2)


def compare(manager: ModelManager, text: str, voice: str | None, params: GenerationParams,
            config_a: OptimizationConfig, config_b: OptimizationConfig) -> Comparison:
    """Run A then B. The token budget is fixed before either runs, so both sides do the
    same amount of work even when ``params`` leaves it to be derived from the text."""
    text = check_text(text)
    if params.max_new_tokens is None:
        params = replace(params, max_new_tokens=default_max_new_tokens(text))
    a = manager.generate(text, voice, params, config_a)
    b = manager.generate(text, voice, params, config_b)
    return Comparison(a, b)
