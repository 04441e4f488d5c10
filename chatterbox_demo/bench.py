"""The benchmark: presets measured in one process, like with like.

Every row uses the same text, voice, seed and number of speech tokens (the stop token is
masked, so T3 always decodes exactly ``tokens``). Warm-up (building the variant, compiling,
one untimed run of the measured generation) is timed apart from the steady-state repeats,
whose median and minimum are reported; the repeats are taken in turns across the rows. The
A/B tab measures with :class:`Measurement` too.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
from chatterbox.models.s3tokenizer import SPEECH_VOCAB_SIZE

from . import fidelity, hardware, plots
from .config import PRESETS, GenerationParams, get_preset
from .files import write_atomically
from .manager import ModelManager, Synthesis
from .optimizations import DEFAULT_THREADS, module_bytes, thread_count, unavailable_reason
from .pipeline import padded_text_tokens

DEFAULT_TEXT = ("The quick brown fox jumps over the lazy dog, then rests in the warm "
                "afternoon sun.")
STAGES = (*plots.STAGES, "total_s")


def machine_info(manager: ModelManager) -> dict:
    device = manager.device
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_family_model": _cpu_family_model(),
        "cpu_flags": hardware.path_flags(),
        "cores": os.cpu_count(),
        # The default; a row whose configuration sets cpu_threads has its own "threads"
        # (read after the run, this named whatever the last row had set).
        "threads": DEFAULT_THREADS,
        "device": device,
        "weights": manager.loaded.source if manager.loaded else manager.weights_spec,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    return hardware.cpuinfo_fields().get("model name") or platform.processor() or "unknown"


def _cpu_family_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """x86's "family F, model M" (one model name, "AMD EPYC", has covered Zen 3, 4 and 5
    here: family 25 model 1, family 25 model 17, family 26 model 2); None elsewhere."""
    fields = hardware.cpuinfo_fields(cpuinfo)
    if "cpu family" not in fields or "model" not in fields:
        return None
    return f"family {fields['cpu family']}, model {fields['model']}"


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_mb(device: str) -> float | None:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:  # the peak resident set since reset_peak_memory
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class Measurement:
    """One configuration's row, taken one repeat at a time, so that :func:`run` can take
    its rows' repeats in turns: a drift in the machine's speed during a run then reaches
    every row alike instead of whichever ran last."""

    def __init__(self, manager: ModelManager, config, text: str, voice: str | None,
                 params: GenerationParams, ignore_stop: bool = False, warmup: bool = True):
        """Build ``config``'s variant and warm it up with one untimed run of the very
        generation measured (when ``warmup``); ``warmup_s`` is the build plus warm-up time.

        The whole generation, not a short one: a layer's first call at each new length
        costs extra once (oneDNN builds its kernels per shape; CUDA graphs are captured per
        bucket of cache length), so a short warm-up left that to the first timed run, and
        the first row, the speedups' reference, paid it (on the tiny model three identical
        rows measured 1.0, 1.25 and 1.39)."""
        self.manager, self.config, self.text, self.voice = manager, config, text, voice
        self.params, self.ignore_stop = params, ignore_stop
        started = time.perf_counter()
        # The variant the generation runs on (a fine-tuned voice's own), and only its size
        # kept: holding the module would keep it in memory after the manager drops it.
        t3, _ = manager.variant(config, manager.adapter_of(voice))
        self.t3_weight_bytes = module_bytes(t3.tfmr) + module_bytes(t3.speech_head)
        if warmup:
            manager.generate(text, voice, params, config, ignore_stop=ignore_stop)
        self.warmup_s = time.perf_counter() - started
        self.runs: list[Synthesis] = []
        self.peak_mb = 0.0

    def repeat(self) -> None:
        device = self.manager.device
        reset_peak_memory(device)
        self.runs.append(self.manager.generate(self.text, self.voice, self.params, self.config,
                                               ignore_stop=self.ignore_stop))
        self.peak_mb = max(self.peak_mb, peak_memory_mb(device) or 0)

    def row(self, stream: bool = False) -> dict:
        """The figures over the repeats taken (medians and minima), plus the last
        result's audio under ``"synthesis"``. With ``stream``, one more run of the same
        generation streamed, after an untimed one (S3Gen renders blocks of lengths the
        one-shot warm-up never ran, and a first call at a new length costs extra once:
        the first streamed run took 17% longer on the tiny model): ``first_audio_s`` (time
        to the first playable audio), ``stream_total_s``, and ``first_audio_share`` (first
        audio over the one-shot total: how much sooner a listener hears something)."""
        config, runs = self.config, self.runs
        last = runs[-1].report
        row = {"device": self.manager.device, "t3_dtype": config.t3_dtype,
               "t3_quant": config.t3_quant, "t3_decoder": config.t3_decoder,
               "threads": thread_count(config), "warmup_s": round(self.warmup_s, 3)}
        for stage in STAGES:
            values = [r.report["timings"][stage] for r in runs]
            row[stage] = round(statistics.median(values), 4)
            row[stage.replace("_s", "_min_s")] = round(min(values), 4)
        tokens = last["timings"]["t3_tokens"]
        row["t3_tokens"] = tokens
        row["t3_tokens_per_s"] = round(tokens / row["t3_s"], 2) if row["t3_s"] else None
        # Tokens over the whole T3 stage, the prompt's prefill included (what a listener
        # waits for). Each decode step reads every transformer weight once, so bytes x
        # tokens/s is the bandwidth achieved, to hold against the machine's: a lower bound
        # for the steps alone, since the stage's time includes the prefill.
        weight_bytes = self.t3_weight_bytes
        row["t3_weights_mb"] = round(weight_bytes / 2**20, 1)
        row["t3_gb_per_s"] = (round(weight_bytes * row["t3_tokens_per_s"] / 1e9, 2)
                              if row["t3_tokens_per_s"] else None)
        row["audio_seconds"] = last["audio_seconds"]
        row["rtf"] = round(row["total_s"] / last["audio_seconds"], 3) \
            if last["audio_seconds"] else None
        # The process's peak: it holds every variant the manager keeps built (the pristine
        # fp32 weights among them), so the rows of one run read alike; t3_weights_mb is
        # what differs. (What the generation adds over the resident set is no figure on a
        # CPU either: the allocator keeps freed memory, so after the warm-up it is ~0.)
        row["peak_mem_mb"] = round(self.peak_mb, 1)
        row["voice_source"] = last["voice"]["source"]
        if stream:
            for _ in range(2):  # the warm-up, then the one measured
                *_, end = self.manager.stream(self.text, self.voice, self.params, config,
                                              ignore_stop=self.ignore_stop)
            streamed = end.synthesis.report
            row["first_audio_s"] = streamed["first_audio_s"]
            row["stream_total_s"] = streamed["timings"]["total_s"]
            row["first_audio_share"] = round(streamed["first_audio_s"] / row["total_s"], 3)
            row["stream_pieces"] = streamed["pieces"]
        row["synthesis"] = runs[-1]
        return row


def fidelity_row(manager: ModelManager, config, text: str, voice: str,
                 speech_tokens: torch.Tensor, references: dict | None = None) -> dict:
    """T3 logits and S3Gen mel agreement of ``config`` with fp32 stock, same inputs.
    ``references`` caches the fp32 outputs across rows of one run, per voice: each voice
    has its own conditionals, and a fine-tuned one its own fp32 T3 (the adapter merged),
    which its variants are built from and held against."""
    tts = manager.load().tts
    adapter = manager.adapter_of(voice)
    t3, s3gen = manager.variant(config, adapter)
    conds, _ = manager.library.conditionals(manager.library.get(voice))
    text_tokens = padded_text_tokens(tts, t3, text)
    references = {} if references is None else references
    if voice not in references:
        references[voice] = fidelity.reference(manager.t3_base(adapter), tts.s3gen, conds,
                                               text_tokens, speech_tokens)
    result = fidelity.measure(references[voice], t3, s3gen, conds, text_tokens, speech_tokens,
                              config.cfm_steps, config.cfm_cfg, config.prompt_seconds,
                              config.cfm_parallel_rows)
    return {"logits_cosine": round(result.logits_cosine, 5),
            "top1_agreement": round(result.top1_agreement, 4),
            "mel_snr_db": round(result.mel_snr_db, 2)}


def run(manager: ModelManager, presets: list[str], text: str = DEFAULT_TEXT,
        voice: str | None = None, tokens: int = 100, repeats: int = 1, seed: int = 0,
        with_fidelity: bool = True, log=print, configs: dict | None = None,
        stream: bool = False, voices: list[str] | None = None) -> dict:
    """Measure each preset; a preset that fails becomes a row with its error.
    ``configs`` maps extra names (the sweep's points) to configurations; ``stream`` adds
    the streamed columns (see :meth:`Measurement.row`). With ``voices``, every preset runs once per
    voice (a fine-tuned voice against the same speaker as a reference clip, say)."""
    manager.load()
    voices = voices or [voice or manager.library.names()[0]]
    for name in voices:
        manager.library.get(name)  # an unknown voice fails before minutes of measuring
    params = GenerationParams(seed=seed, max_new_tokens=tokens)
    # One fixed token sequence for every fidelity row: valid speech tokens from the seed.
    generator = torch.Generator().manual_seed(seed)
    fixed_tokens = torch.randint(0, SPEECH_VOCAB_SIZE, (tokens,), generator=generator)
    runs = [(p, v) for p in presets for v in voices]
    rows = [{"preset": name, "voice": voice} for name, voice in runs]
    known = {**PRESETS, **(configs or {})}
    # The repeats in turns (every row's first, then every row's second...), so that the
    # machine's drift over a run, which reached 20-30% here, does not favour any row;
    # unless the rows need more variants than the manager keeps built, when turns would
    # rebuild (and recompile) them between repeats: then one row after another.
    in_turns = manager.variants_fit([(known[name], voice) for name, voice in runs
                                      if name in known])
    log(f"[bench] repeats {'in turns' if in_turns else 'one row after another'}")
    measurements: dict[int, Measurement] = {}
    references: dict = {}

    def attempt(index: int, action) -> None:
        """Run one step of a row; a failure becomes the row's error and ends the row."""
        try:
            action(index)
        except Exception as exc:  # report and go on to the next preset
            rows[index]["error"] = f"{type(exc).__name__}: {exc}"
            measurements.pop(index, None)

    def start(index: int) -> None:
        name, voice = runs[index]
        log(f"[bench] {name} ({voice}): warm-up")
        config = known.get(name) or get_preset(name)  # an unknown name: the row's error
        reason = unavailable_reason(config, manager.device)
        if reason:
            raise ValueError(f"unavailable on {manager.device}: {reason}")
        measurements[index] = Measurement(manager, config, text, voice, params,
                                          ignore_stop=True)

    def repeat(index: int) -> None:
        log(f"[bench] {runs[index][0]} ({runs[index][1]}): repeat")
        measurements[index].repeat()

    def finish(index: int) -> None:
        row = rows[index]
        row.update(measurements[index].row(stream))
        del row["synthesis"]
        if with_fidelity:
            row.update(fidelity_row(manager, measurements[index].config, text, row["voice"],
                                    fixed_tokens, references))

    steps, indices = (start, *[repeat] * repeats, finish), range(len(runs))
    order = ([(step, index) for step in steps for index in indices] if in_turns
             else [(step, index) for index in indices for step in steps])
    for step, index in order:
        if step is start or index in measurements:  # a failed row takes no more steps
            attempt(index, step)
    for row in rows:
        log(f"[bench] {row['preset']}: " + (row.get("error") or
                                            f"total {row['total_s']:.2f} s, T3 "
                                            f"{row['t3_tokens_per_s']} tokens/s, S3Gen "
                                            f"{row['s3gen_s']:.2f} s"))
    # Against the first preset's row of the same voice, and against nothing when that row
    # failed: taking the next row that ran instead changed what "speedup" meant unseen.
    firsts = {voice: rows[runs.index((presets[0], voice))] for voice in voices}
    for row in rows:
        first = firsts[row["voice"]]
        if "error" not in first and "error" not in row and "total_s" in row:
            row["speedup"] = round(first["total_s"] / row["total_s"], 2)
            row["t3_speedup"] = round(first["t3_s"] / row["t3_s"], 2)
            row["s3gen_speedup"] = round(first["s3gen_s"] / row["s3gen_s"], 2)
    return {"machine": machine_info(manager),
            "settings": {"text": text, "voices": voices, "tokens": tokens, "repeats": repeats,
                         "seed": seed, "stream": stream},
            "rows": rows}


MARKDOWN_COLUMNS = (
    ("preset", "preset"), ("voice", "voice"), ("warmup_s", "warm-up s"),
    ("conditioning_s", "cond. s"),
    ("t3_s", "T3 s"), ("t3_tokens_per_s", "T3 tok/s"), ("t3_gb_per_s", "T3 GB/s"),
    ("s3gen_s", "S3Gen s"), ("watermark_s", "wm s"), ("total_s", "total s"), ("rtf", "RTF"),
    ("peak_mem_mb", "peak MB"), ("t3_weights_mb", "T3 weights MB"),
    ("logits_cosine", "logits cos"), ("top1_agreement", "top-1"),
    ("mel_snr_db", "mel SNR dB"), ("speedup", "speedup"),
    ("first_audio_s", "first audio s"), ("first_audio_share", "first audio / total"),
    ("stream_total_s", "streamed total s"),
)


def to_markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    # Columns no row fills (the streaming ones without --stream) are left out. A failed
    # row's message has a column of its own: put under whichever column came third, it
    # was dropped when every row had failed (the header then had two, and GitHub's tables
    # drop the cells a header lacks).
    failed = any("error" in row for row in result["rows"])
    columns = [*MARKDOWN_COLUMNS[:2], *([("error", "error")] if failed else []),
               *[(key, label) for key, label in MARKDOWN_COLUMNS[2:]
                 if any(row.get(key) is not None for row in result["rows"])]]
    flags = f" ({', '.join(m['cpu_flags'])})" if m.get("cpu_flags") else ""
    streamed = ("; the streamed columns from one run after an untimed one"
                if any("first_audio_s" in row for row in result["rows"]) else "")
    lines = [f"{m['cpu']}{flags}, {m['cores']} cores, torch {m['torch']}, device {m['device']}"
             + (f" ({m['gpu']})" if "gpu" in m else "")
             + f", weights {m['weights']}; {s['tokens']} speech tokens, {s['repeats']} "
             f"repeat(s), medians{streamed}", "",
             "| " + " | ".join(label for _, label in columns) + " |",
             "|" + "---|" * len(columns)]
    for row in result["rows"]:
        lines.append("| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    """A table cell: an error message's own | or line break would end the cell or row."""
    text = "" if value is None else str(value)
    return " ".join(text.replace("|", "\\|").split())


def to_json(result: dict, indent: int | None = 1) -> str:
    """Strict JSON, which every reader takes: a figure that is not finite (the mel SNR of
    audio identical to fp32's is inf) is null, not Python's ``Infinity``. Runs recorded
    before (docs/*.json) hold ``Infinity``, which Python's json still reads."""
    return json.dumps(_finite(result), indent=indent, default=str, allow_nan=False)


def _finite(value):
    """``value`` with every float that is not finite, however deep, replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


# The results are written whole or not at all (a full disk cut an earlier bench.json
# short): into a temporary file beside the path, then renamed over it.


def write_json(result: dict, path: Path) -> None:
    text = to_json(result) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text))


def write_markdown(result: dict, path: Path) -> None:
    text = to_markdown(result)
    write_atomically(path, lambda tmp: tmp.write_text(text))


def _save(fig, path: Path) -> None:
    # Drawn in memory, by the path's suffix: the temporary file's own name ends in .tmpPID
    # (and .svgz would record that name inside).
    image = io.BytesIO()
    fig.savefig(image, format=Path(path).suffix[1:].lower(), dpi=120)
    write_atomically(path, lambda tmp: tmp.write_bytes(image.getvalue()))


# matplotlib writes these only through a program the demo does not install: .pgf through
# LaTeX (xelatex), which failed with a traceback after the whole benchmark had run.
NEEDS_OTHER_PROGRAMS = {"pgf"}


def plot_formats() -> list[str]:
    """The suffixes (without the dot) :func:`plot` and :func:`plot_tradeoff` can write
    with matplotlib alone: it picks the image type by the suffix."""
    plots.pyplot()  # the Agg backend, before its canvas is imported
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return sorted(set(FigureCanvasAgg.get_supported_filetypes()) - NEEDS_OTHER_PROGRAMS)


def row_labels(rows: list[dict], bars: bool = False) -> list[str]:
    """A label per row that no other row shares: matplotlib draws the rows of one label
    as one bar, stacked over each other. With several voices each label names its voice;
    a preset listed twice for a voice is numbered (``cached #1``, ``cached #2``). For
    ``bars``, narrow, a changed switch (``cached+cfm_steps=8``) and the voice take lines of
    their own."""
    several_voices = len({row.get("voice") for row in rows}) > 1
    labels = []
    for row in rows:
        preset, voice = row["preset"], f"({row.get('voice')})"
        if bars:
            labels.append(preset.replace("+", "\n+") + (f"\n{voice}" if several_voices else ""))
        else:
            labels.append(preset + (f" {voice}" if several_voices else ""))
    counts, seen = Counter(labels), Counter()
    for index, label in enumerate(labels):
        if counts[label] > 1:
            seen[label] += 1
            labels[index] = f"{label} #{seen[label]}"
    return labels


def plot(result: dict, path: Path) -> None:
    """Stacked per-stage seconds per row: a preset, and its voice when there are several."""
    # Labelled over all the rows, failed ones too, so that "#2" is the table's second.
    labelled = [(label, row) for label, row in zip(row_labels(result["rows"], bars=True),
                                                    result["rows"], strict=True)
                if "total_s" in row]
    fig = plots.stage_bars([label for label, _ in labelled], [row for _, row in labelled],
                           f"{result['settings']['tokens']} speech tokens on "
                           f"{result['machine']['device']}")
    for label in fig.axes[0].get_xticklabels():
        label.set_rotation(30)
        label.set_horizontalalignment("right")
    fig.tight_layout()
    _save(fig, path)


def plot_tradeoff(result: dict, path: Path) -> None:
    """S3Gen seconds against mel SNR per row: what each audio-changing knob buys."""
    plt = plots.pyplot()
    labelled = [(label, row) for label, row in zip(row_labels(result["rows"]), result["rows"],
                                                    strict=True)
                if "s3gen_s" in row and "mel_snr_db" in row]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, row in labelled:
        snr = min(row["mel_snr_db"], 60.0)  # identical output plots at the top, not at inf
        ax.scatter(row["s3gen_s"], snr)
        ax.annotate(label, (row["s3gen_s"], snr), textcoords="offset points",
                    xytext=(5, 4), fontsize=9)
    ax.set_xlabel("S3Gen seconds (median)")
    ax.set_ylabel("mel SNR against fp32 upstream, dB (60 = identical)")
    ax.set_title(f"Speed and fidelity, {result['settings']['tokens']} speech tokens")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
