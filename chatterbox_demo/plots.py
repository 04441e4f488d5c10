"""Figures: per-stage stacked bars and mel spectrograms, for the A/B tab and the benchmark.

matplotlib is imported on demand and always on its file-only backend (no display here);
figures are returned for Gradio to render, or saved by the benchmark.
"""

from __future__ import annotations

import numpy as np

STAGES = ("conditioning_s", "t3_s", "s3gen_s", "watermark_s")


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported on demand."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def stage_bars(labels: list[str], rows: list[dict], title: str):
    """One stacked bar per row: seconds per pipeline stage."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, len(rows) * 1.3), 3.6))
    bottom = np.zeros(len(rows))
    for stage in STAGES:
        values = np.array([row.get(stage) or 0.0 for row in rows])
        ax.bar(labels, values, bottom=bottom, label=stage[:-2])
        bottom += values
    ax.set_ylabel("seconds (median)")
    ax.set_title(title)
    # Beside the bars, not over them: the tallest bar reaches the top of the axes.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    plt.close(fig)  # Gradio renders the figure object; keep pyplot's registry empty
    return fig


def mel_power(wav: np.ndarray, sample_rate: int, n_mels: int = 80):
    """(n_mels, frames) mel power spectrogram of a mono clip, as a torch tensor."""
    import torch
    import torchaudio

    transform = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=1024,
                                                     hop_length=256, n_mels=n_mels)
    return transform(torch.as_tensor(wav, dtype=torch.float32))


def log_mel(wav: np.ndarray, sample_rate: int, n_mels: int = 80) -> np.ndarray:
    """(n_mels, frames) log-mel spectrogram of a mono clip."""
    return mel_power(wav, sample_rate, n_mels).clamp(min=1e-5).log().numpy()


def mel_figure(clips: list[tuple[str, np.ndarray, int]]):
    """Mel spectrograms of (label, wav, sample_rate) clips, one above the other."""
    plt = pyplot()
    fig, axes = plt.subplots(len(clips), 1, figsize=(8, 2.2 * len(clips)), squeeze=False)
    for ax, (label, wav, sample_rate) in zip(axes[:, 0], clips, strict=True):
        ax.imshow(log_mel(wav, sample_rate), origin="lower", aspect="auto", cmap="magma")
        ax.set_title(label, fontsize=10)
        ax.set_ylabel("mel bin")
    axes[-1, 0].set_xlabel("frame (10.7 ms)")
    fig.tight_layout()
    plt.close(fig)
    return fig
