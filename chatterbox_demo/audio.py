"""Reading and checking reference audio, and writing results.

Every reference clip passes :func:`load_reference` before the model sees it, so a bad upload
is refused with a message that says what to do, not with a stack trace from deep inside
librosa or the S3 tokenizer.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from .files import write_atomically

MIN_SECONDS = 1.0
MAX_SECONDS = 300.0  # 5 minutes; only the first 10 s are used, the rest is wasted upload
MAX_BYTES = 100 * 1024 * 1024
# Telephone quality. Below it a clip holds none of the 4-8 kHz band that tells voices apart
# (the S3 tokenizer and voice encoder work at 16 kHz, S3Gen's reference at 24 kHz), so the
# "clone" would only be the model's guess.
MIN_SAMPLE_RATE = 8000
SILENCE_PEAK = 1e-3  # below -60 dBFS everywhere counts as silence
# Float audio is nominally within +-1 (integer formats are read scaled into it). A little
# over is ordinary float headroom; a peak of 1000 (+60 dBFS) is no recording level but a
# damaged or wrongly scaled file, and from about 1e19 librosa's mel squares overflow to
# inf and the conditionals computation crashes deep inside it.
MAX_PEAK = 1e3
EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg")

log = logging.getLogger(__name__)


class AudioError(ValueError):
    """A reference clip the app cannot use; the message tells the user why."""


@dataclass(frozen=True)
class ReferenceClip:
    path: Path
    sha256: str  # of the file's bytes: the content key of the conditionals cache
    sample_rate: int
    channels: int
    seconds: float


def load_reference(path: str | os.PathLike | None) -> ReferenceClip:
    """Check that ``path`` is a usable reference clip and describe it."""
    if path is None or str(path).strip() == "":
        raise AudioError("No audio file given: upload or record a reference clip first.")
    path = Path(path)
    if not path.exists():
        raise AudioError(f"Audio file {path.name!r} does not exist.")
    if not path.is_file():
        raise AudioError(f"{path.name!r} is not a file; choose an audio file.")
    size = path.stat().st_size
    if size == 0:
        raise AudioError(f"{path.name!r} is empty; choose a WAV, FLAC, MP3 or OGG recording.")
    if size > MAX_BYTES:
        raise AudioError(
            f"{path.name!r} is {size / 2**20:.0f} MB; the limit is {MAX_BYTES // 2**20} MB."
        )
    data = path.read_bytes()
    try:
        samples, sample_rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:
        # soundfile's own message names an in-memory buffer, which helps nobody.
        log.info("Could not decode %s: %s", path, exc)
        raise AudioError(
            f"{path.name!r} is not a readable audio file; use WAV, FLAC, MP3 or OGG."
        ) from None
    frames, channels = samples.shape
    seconds = frames / sample_rate if sample_rate else 0.0
    if frames == 0:
        raise AudioError(f"{path.name!r} contains no audio samples.")
    if sample_rate < MIN_SAMPLE_RATE:
        raise AudioError(
            f"{path.name!r} is sampled at {sample_rate} Hz; a reference needs at least "
            f"{MIN_SAMPLE_RATE} Hz (16 kHz or more works best): record or export it again."
        )
    if not np.isfinite(samples).all():
        raise AudioError(f"{path.name!r} contains invalid (NaN or infinite) samples.")
    if seconds < MIN_SECONDS:
        raise AudioError(
            f"{path.name!r} is {seconds:.2f} s long; a reference needs at least "
            f"{MIN_SECONDS:.0f} s of speech (5-10 s works best)."
        )
    if seconds > MAX_SECONDS:
        raise AudioError(
            f"{path.name!r} is {seconds / 60:.1f} minutes long; the limit is "
            f"{MAX_SECONDS / 60:.0f} minutes (only the first 10 s are used anyway)."
        )
    peak = float(np.abs(samples).max())
    if peak < SILENCE_PEAK:
        raise AudioError(f"{path.name!r} is silent; record or upload a clip of someone speaking.")
    if peak > MAX_PEAK:
        raise AudioError(
            f"{path.name!r} has samples up to {peak:.3g}, far outside the -1 to 1 of float "
            "audio: it is damaged or wrongly scaled; normalise it to a peak of at most 1 and "
            "export it again."
        )
    return ReferenceClip(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        sample_rate=int(sample_rate),
        channels=int(channels),
        seconds=float(seconds),
    )


def to_pcm16(samples: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] as 16-bit integers (clipped), as players and PCM want."""
    return (np.clip(samples, -1.0, 1.0) * 32767).astype(np.int16)


def write_wav(path: str | os.PathLike, samples: np.ndarray, sample_rate: int) -> Path:
    """Write mono float samples as 16-bit PCM WAV, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = np.asarray(samples, dtype=np.float32)
    return write_atomically(path, lambda tmp: sf.write(tmp, samples, sample_rate,
                                                        subtype="PCM_16", format="WAV"))
