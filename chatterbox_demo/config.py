"""Options: generation settings and optimization configurations, as frozen dataclasses.

The UI, CLI and benchmark read their choices (ranges, defaults, preset names) from here,
never from literals of their own.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

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
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {kind} between {low} and {high} (got {value!r})")
    if math.isnan(value) or not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high} (got {value!r})")
    if integer and value != int(value):
        raise ValueError(f"{name} must be {kind} (got {value!r})")


def default_max_new_tokens(text: str) -> int:
    """A token budget from the text: English speech runs about 15 characters a second,
    so allow 2.5 tokens per character (about 1.5x headroom) plus a second of slack."""
    low, high = RANGES["max_new_tokens"]
    return max(2 * SPEECH_TOKENS_PER_SECOND, min(high, int(len(text) * 2.5) + 25))


@dataclass(frozen=True)
class OptimizationConfig:
    """How the pipeline runs. Each field is one switch; ``baseline`` is the stock path."""

    # Reuse the voice library's conditionals (memory, then disk) instead of recomputing
    # them from the reference audio on every call as stock generate(audio_prompt_path=...)
    # does. Saves the whole conditioning stage (seconds on a CPU).
    cached_conditionals: bool = True


PRESETS: dict[str, OptimizationConfig] = {
    # Exactly the upstream path: conditionals recomputed per call.
    "baseline": OptimizationConfig(cached_conditionals=False),
    "cached": OptimizationConfig(cached_conditionals=True),
}
DEFAULT_PRESET = "cached"


def get_preset(name: str) -> OptimizationConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"Unknown preset {name!r}; available: {', '.join(PRESETS)}"
        ) from None
