"""Shared fixtures: an offline environment, one tiny model per session, synthetic audio.

No test reaches the network: ``HF_HUB_OFFLINE`` is set here, before anything imports
``huggingface_hub`` (which reads it once, at import).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

# Before any import of chatterbox / huggingface_hub, which read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
_SESSION_ROOT = Path(tempfile.mkdtemp(prefix="chatterbox-demo-tests-"))
os.environ["CHATTERBOX_DEMO_CACHE"] = str(_SESSION_ROOT / "env-cache")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One intra-op thread for torch here and in the CLI subprocesses. The tiny model gains
# nothing from more, and on a 2-core machine that is also running something else, two
# OpenMP threads spin against each other: generation then ran 30x slower (16 s, not 0.5 s).
# Set OMP_NUM_THREADS yourself to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import soundfile as sf  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
VOICES_DIR = REPO / "voices"
SHIPPED = ("bright-high", "calm-mid", "narrator-low")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: builds the full-size model (about a minute); deselect with -m 'not slow'"
    )


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_ROOT, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _offline_session():
    """Nothing in the suite may write to the user's real cache or reach the Hub."""
    import huggingface_hub.constants as hf_constants

    from chatterbox_demo import manager

    assert hf_constants.HF_HUB_OFFLINE, "HF_HUB_OFFLINE must be set before huggingface_hub loads"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(manager, "DEFAULT_CACHE", _SESSION_ROOT / "default-cache")
        yield


@pytest.fixture(scope="session")
def session_cache() -> Path:
    return Path(os.environ["CHATTERBOX_DEMO_CACHE"])


@pytest.fixture(scope="session")
def tiny_manager(session_cache):
    """The tiny model, loaded once (about 5 s) and shared by every test that needs a model.

    Tests must not change its voice library or preset except through ``monkeypatch``.
    """
    from chatterbox_demo.manager import ModelManager

    manager = ModelManager("tiny", device="cpu", cache_dir=session_cache,
                           shipped_voices=VOICES_DIR)
    manager.load()
    # The app starts on the device's fastest preset; these tests exercise the stock
    # pipeline unless they switch (and switch back) themselves.
    manager.apply_preset("cached")
    return manager


@pytest.fixture
def make_manager(tiny_manager, tmp_path, monkeypatch):
    """A fresh ModelManager with its own cache directory that reuses the session's loaded
    tiny weights (no second model build). Its shipped voices' conditionals are copied from
    the session cache so registering them computes nothing."""
    from chatterbox_demo import weights
    from chatterbox_demo.manager import ModelManager

    monkeypatch.setattr(weights, "load", lambda spec, device, seed=0: tiny_manager.loaded)

    def factory(cache_dir: Path | None = None, shipped_voices: Path | None = VOICES_DIR,
                load: bool = True, **options):
        cache_dir = Path(cache_dir or tmp_path / "manager-cache")
        conds = tiny_manager.cache_dir / "conds"
        if shipped_voices is not None and not (cache_dir / "conds").exists():
            shutil.copytree(conds, cache_dir / "conds")
        manager = ModelManager("tiny", device="cpu", cache_dir=cache_dir,
                               shipped_voices=shipped_voices, **options)
        if load:
            manager.load()
        return manager

    return factory


def presets_keeping_semantics(device: str) -> list[str]:
    """The presets that keep upstream semantics and can run on ``device``: the ones the
    fidelity thresholds apply to."""
    from chatterbox_demo.config import PRESETS
    from chatterbox_demo.optimizations import unavailable_reason

    return [name for name, config in PRESETS.items()
            if not config.changes_output and unavailable_reason(config, device) is None]


def assert_agrees_with_fp32(manager, config, text: str = "Fidelity check.", tokens: int = 40,
                            top1: bool = True) -> None:
    """The thresholds docs/benchmarks.md promises for configurations that keep upstream
    semantics: logits cosine, top-1 agreement and mel SNR against the fp32 stock path, over
    a fixed sequence of ``tokens`` speech tokens."""
    import torch

    from chatterbox_demo.bench import fidelity_row

    fixed = torch.randint(0, 6561, (tokens,), generator=torch.Generator().manual_seed(0))
    row = fidelity_row(manager, config, text, "calm-mid", fixed)
    assert row["logits_cosine"] >= 0.999, row
    # Random weights give nearly flat logits, where near-ties make top-1 the most fragile
    # figure; real weights are far more peaked.
    assert not top1 or row["top1_agreement"] >= 0.8, row
    assert row["mel_snr_db"] >= 25.0, row


def slow_first_variant_build(manager, monkeypatch, seconds: float = 2.0) -> None:
    """Make ``manager``'s next variant build take ``seconds`` longer, as building (or
    compiling) a full-size variant would; the builds after it run as they are."""
    build, built = manager.variant, []

    def slow_first(*args, **kwargs):
        if not built:
            time.sleep(seconds)
        built.append(args)
        return build(*args, **kwargs)

    monkeypatch.setattr(manager, "variant", slow_first)


@pytest.fixture
def ref_wav() -> Path:
    """One of the shipped reference clips (real espeak-ng speech, 24 kHz mono)."""
    path = VOICES_DIR / "calm-mid.wav"
    assert path.is_file(), path
    return path


def speech_like(seconds: float, sample_rate: int, channels: int = 1, seed: int = 0,
                kind: str = "speech", amplitude: float = 0.5) -> np.ndarray:
    """A (frames, channels) float32 signal.

    ``speech``: a harmonic series on a wandering pitch, gated into 4 Hz "syllables", with a
    little breath noise; ``noise``: white noise; ``sine``: a 220 Hz tone; ``silence``: zeros.
    """
    rng = np.random.default_rng(seed)
    frames = int(round(seconds * sample_rate))
    t = np.arange(frames) / sample_rate
    if kind == "silence":
        mono = np.zeros(frames)
    elif kind == "noise":
        mono = rng.uniform(-1.0, 1.0, frames)
    elif kind == "sine":
        mono = np.sin(2 * np.pi * 220.0 * t)
    elif kind == "speech":
        f0 = 140.0 + 30.0 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, np.pi))
        phase = 2 * np.pi * np.cumsum(f0) / sample_rate
        voiced = sum(np.sin(k * phase) / k for k in range(1, 8) if k * 160 < sample_rate / 2)
        envelope = np.clip(np.sin(2 * np.pi * 4.0 * t), 0.0, None) ** 0.5
        mono = envelope * voiced + 0.05 * rng.standard_normal(frames)
    else:
        raise ValueError(kind)
    if np.abs(mono).max() > 0:
        mono = amplitude * mono / np.abs(mono).max()
    out = np.repeat(mono[:, None], channels, axis=1)
    if channels > 1:  # make the channels differ a little, as real stereo does
        out[:, 1:] *= 0.8
    return out.astype(np.float32)


def write_audio(path: Path, seconds: float = 2.0, sample_rate: int = 16000, channels: int = 1,
                subtype: str | None = "PCM_16", format: str | None = None, kind: str = "speech",
                seed: int = 0, data: np.ndarray | None = None) -> Path:
    """Write a synthetic clip with soundfile; ``format`` defaults from the extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = speech_like(seconds, sample_rate, channels, seed, kind)
    sf.write(path, data, sample_rate, subtype=subtype, format=format)
    return path


@pytest.fixture
def make_wav(tmp_path):
    """``make_wav(name, **write_audio kwargs)`` writes a synthetic clip under tmp_path."""

    def factory(name: str = "clip.wav", **kwargs) -> Path:
        return write_audio(tmp_path / name, **kwargs)

    return factory


def dead_pid() -> int:
    """The process number of a process that has ended."""
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    return int(child.stdout)
