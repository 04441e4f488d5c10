"""The Gradio app: Voices, Synthesize and A/B Compare tabs. The only module importing gradio.

Every handler goes through the process-wide :class:`ModelManager`; nothing model-sized is
kept per browser session. Model-bound events share one concurrency slot, so one generation
runs on the model at a time and the rest wait in the queue with their position shown.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import html
import inspect
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np

from .audio import MAX_BYTES as MAX_UPLOAD_BYTES
from .audio import to_pcm16
from .compare import TABLE_HEADERS, Comparison, check_runnable, compare_steps
from .config import (
    BASELINE,
    COMPILE_MODES,
    CPU_BF16,
    DEFAULT_PRESET,
    PRECISIONS,
    PRESET_DESCRIPTIONS,
    PRESETS,
    RANGES,
    S3GEN_QUANTS,
    T3_DECODERS,
    T3_QUANTS,
    GenerationParams,
    OptimizationConfig,
    get_preset,
    preset_name,
    queue_max,
    upload_ttl_s,
)
from .finetune import METHODS, settings_from
from .manager import ModelManager
from .optimizations import unavailable_reason
from .pipeline import GenerationError
from .speaker_data import extract_zip
from .voices import USER_KINDS, check_name

log = logging.getLogger(__name__)

USER_ERRORS = (ValueError, FileNotFoundError, GenerationError)
MODEL_SLOT = "model"  # concurrency_id shared by every event that runs the model
# The page's fine-tune cannot be cancelled and holds its queue slot while it runs: hours
# on a GPU at most, not days (a million steps on the tiny model alone was 11 days on a CPU).
PAGE_MAX_STEPS = 2000
# Uploads and generated files are deleted this many seconds after they were written (the
# library keeps its own copy of a voice's audio). Not at once: Gradio stores uploads by
# content, so two users uploading the same clip share one file, and deleting it after one
# request would pull it from under the other (the soak test caught exactly that).
UPLOAD_TTL_S = upload_ttl_s()
# Gradio looks for expired files every this many seconds, so a file outlives the TTL by up
# to this much: a tenth of it, at most a minute (with the TTL as the period, as before,
# files lived up to twice the TTL).
UPLOAD_SWEEP_S = max(1, min(UPLOAD_TTL_S // 10, 60))
TITLE = "Chatterbox TTS: clone, synthesize, compare"


def page_error(message: str) -> gr.Error:
    """An error for the page. Gradio renders the message as HTML, so what a user typed (a
    voice name, a value) is escaped: shown as typed, never as markup. It stays until
    closed: a run can take minutes, and a user who looks back then must still read why
    it failed (a timed notice leaves only a bare "Error" badge)."""
    return gr.Error(html.escape(message, quote=False), duration=None, print_exception=False)


def user_errors(fn):
    """Turn errors a user caused into a readable message in the page; log the rest and
    show a short notice instead of a stack trace."""

    def readable(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, USER_ERRORS):
            return page_error(str(exc))
        log.exception("Unexpected error in %s", fn.__name__)
        return page_error(f"Something went wrong ({type(exc).__name__}); "
                          "the server log has the details.")

    # Gradio streams a handler's results when it is a generator function, so the wrapper
    # of a generator must be one too (and catch what the generator raises as it runs).
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise readable(exc) from None

        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise readable(exc) from None

    return wrapper


GPU_SECONDS = 120  # ZeroGPU's per-call budget for one generation or comparison


def gpu_task(fn):
    """On Hugging Face ZeroGPU hardware (where the ``spaces`` package is importable) run
    ``fn`` inside ``@spaces.GPU``, which attaches a GPU for the call; elsewhere return it
    unchanged."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=GPU_SECONDS)(fn)


def manager() -> ModelManager:
    return ModelManager.instance()


def ensure_loaded(progress: gr.Progress | None = None) -> ModelManager:
    m = manager()
    if m.loaded is None and progress is not None:
        progress(0.0, desc="Loading the model (first request after start-up)")
    m.load(progress=(lambda f, msg: progress(f, desc=msg)) if progress else None)
    return m


# --- header --------------------------------------------------------------------------------


def header_html() -> str:
    status = manager().status()
    parts = [
        f"<b>weights</b> {html.escape(str(status['weights']))}",
        f"<b>device</b> {html.escape(status['device'].upper())}",
        f"<b>preset</b> {html.escape(status['preset'])}",
    ]
    line = " &nbsp;·&nbsp; ".join(parts)
    banner = ""
    if status["banner"]:
        banner = (f"<div id='offline-banner' style='padding:8px 12px;margin-bottom:6px;"
                  f"border-radius:6px;background:#fff3cd;color:#664d03;'>"
                  f"{html.escape(status['banner'])}</div>")
    for notice in manager().notices[-3:]:
        banner += (f"<div class='notice' style='padding:4px 12px;margin-bottom:4px;"
                   f"border-radius:6px;background:#e7f1ff;'>{html.escape(notice)}</div>")
    return f"{banner}<div id='status-line'>{line}</div>"


# --- voices --------------------------------------------------------------------------------

VOICE_HEADERS = ["name", "kind", "exaggeration", "seconds"]


def voice_table() -> list[list]:
    return [[v.name, f"fine-tuned ({v.method})" if v.kind == "finetuned" else v.kind,
             v.exaggeration, "" if v.seconds is None else v.seconds]
            for v in manager().list_voices()]


def voice_choices() -> tuple[list[str], list[str]]:
    """(all voice names, the names a user may rename or remove)."""
    voices = manager().list_voices()
    return ([v.name for v in voices],
            [v.name for v in voices if v.kind in USER_KINDS])


@user_errors
def list_voices() -> list[list]:
    """All voices as rows of name, kind, exaggeration, seconds."""
    ensure_loaded()
    return voice_table()


@gpu_task
@user_errors
def add_voice(audio: str | None, name: str, exaggeration: float,
              progress=gr.Progress()) -> tuple[str, list[list]]:
    """Add a voice from an uploaded or recorded clip; returns a status line and the table."""
    m = ensure_loaded(progress)
    progress(0.5, desc="Computing the voice's conditionals")
    voice = m.add_voice(name, audio, exaggeration)
    return f"Added voice **{html.escape(voice.name)}**.", voice_table()


@user_errors
def remove_voice(name: str) -> tuple[str, list[list]]:
    voice = ensure_loaded().remove_voice(name)
    return f"Removed voice **{html.escape(voice.name)}**.", voice_table()


@user_errors
def ask_to_remove(name: str):
    """The page's Remove button asks first, naming the voice, so that one stray click
    loses nothing; the answer's button does the removing."""
    # The library itself, as the fine-tune's name check: a look-up need not wait for
    # the model's lock, which a running generation holds.
    voice = ensure_loaded().library.user_voice(name, "removed")
    question = (f"Remove **{html.escape(voice.name)}** from the library? Only adding the "
                "same clip again brings it back.")
    return question, voice.name


def show_removal_buttons():
    return gr.update(visible=True)


def hide_removal_question():
    return gr.update(visible=False), ""


@user_errors
def rename_voice(name: str, new_name: str) -> tuple[str, list[list]]:
    voice = ensure_loaded().rename_voice(name, new_name)
    return f"Renamed to **{html.escape(voice.name)}**.", voice_table()


@user_errors
def finetune_voice(dataset_zip: str | None, name: str, method: str, steps,
                   progress=gr.Progress()) -> tuple[str, list[list], str]:
    """Fine-tune T3 on an uploaded dataset zip and add the result as a voice. Its name
    comes back too: one taken while it trained (the name is checked first, but a clip
    voice may be added meanwhile) gets a number rather than losing the trained adapter."""
    m = ensure_loaded(progress)
    if not dataset_zip:
        raise ValueError("Upload a zip of the speaker's clips first (metadata.csv + wavs/, "
                         "or NAME.wav + NAME.txt pairs).")
    name = m.library.check_new_name(name)  # a taken name must not cost a training run first
    steps = _whole(steps, "steps")
    if isinstance(steps, int) and steps > PAGE_MAX_STEPS:
        raise ValueError(f"The page trains up to {PAGE_MAX_STEPS} steps (asked for {steps}); "
                         "use `python -m chatterbox_demo finetune train` for longer runs.")
    settings = settings_from({"method": method, "steps": steps})
    with tempfile.TemporaryDirectory(prefix="chatterbox-finetune-") as work:
        with naming_the_upload(dataset_zip, work):
            folder = extract_zip(Path(dataset_zip), Path(work) / "data")
            progress(0.0, desc="Checking and tokenizing the clips")

            def step_done(step, steps, loss):
                progress(step / steps,
                         desc=f"Training: step {step} of {steps}, loss {loss:.3f}")

            card = m.finetune(folder, Path(work) / "adapter", settings, step_done)
        voice = m.add_finetuned_voice(name, Path(work) / "adapter", next_free_name=True)
    renamed = ""
    if voice.name != name:
        renamed = (f" **{html.escape(name)}** was taken while it trained, so it is "
                   f"saved as **{html.escape(voice.name)}**.")
    status = (f"Fine-tuned **{html.escape(voice.name)}** ({card['method']}, {card['steps']} "
              f"steps on {card['train_clips']} clips): loss {card['train_loss_first']} → "
              f"{card['train_loss_final']}, validation {card['val_loss']}.{renamed}")
    return status, voice_table(), voice.name


@user_errors
def import_adapter(adapter_zip: str | None, name: str) -> tuple[str, list[list]]:
    """Add a zipped adapter directory (what `finetune train` wrote) as a voice."""
    m = ensure_loaded()
    if not adapter_zip:
        raise ValueError("Upload a zip of the adapter directory first.")
    with tempfile.TemporaryDirectory(prefix="chatterbox-adapter-") as work:
        with naming_the_upload(adapter_zip, work):
            folder = extract_zip(Path(adapter_zip), Path(work))
            voice = m.add_finetuned_voice(name, folder)
    return f"Added fine-tuned voice **{html.escape(voice.name)}**.", voice_table()


@contextlib.contextmanager
def naming_the_upload(upload: str, work: str):
    """A user error's message may name a path under ``work``, where an upload was
    unpacked: a server path that means nothing to the user. Name their upload instead."""
    try:
        yield
    except USER_ERRORS as exc:
        under_work = re.escape(str(work)) + r"[^\s'\",;:]*"
        raise type(exc)(re.sub(under_work, f"the uploaded {Path(upload).name}",
                               str(exc))) from None


def refresh_voice_pickers(current_synth: str | None, current_ab: str | None,
                          current_mine: str | None, status: str | None):
    """The pickers after the library changed: each keeps its voice while it exists. Where
    the Synthesize or A/B picker's voice is gone (removed), it falls back to the first and
    the status line says so."""
    names, removable = voice_choices()
    fell_back = []

    def pick(current, choices, picker=None):
        if current in choices:
            return current
        if not choices:
            return None
        if picker and current:
            fell_back.append(f"{picker} now uses **{html.escape(choices[0])}**")
        return choices[0]

    synth, ab = pick(current_synth, names, "Synthesize"), pick(current_ab, names, "A/B")
    note = gr.skip()
    if fell_back:
        note = f"{status or ''} {'; '.join(fell_back)}.".strip()
    return (gr.update(choices=names, value=synth), gr.update(choices=names, value=ab),
            gr.update(choices=removable, value=pick(current_mine, removable)),
            note)


def follow_voice(new: str, current_synth: str | None, current_ab: str | None,
                 old: str | None = None):
    """The pickers after a voice is added (no ``old``: all show it) or renamed (a picker
    that showed ``old`` shows ``new``, and "Your voices" shows it, ready for another
    rename; the refresh would otherwise fall back to the first voice without a word)."""
    new = check_name(new)  # the name as the library stored it
    follow = lambda current: new if old is None or current == old else current  # noqa: E731
    return follow(current_synth), follow(current_ab), new


def voice_exaggeration(name: str | None):
    m = manager()
    if m.loaded is None or not name:
        return gr.update()
    try:
        return m.library.get(name).exaggeration
    except ValueError:
        return gr.update()


# --- checked number inputs -------------------------------------------------------------------


def _check_number_input(component, payload) -> None:
    """An API caller can send anything: name the setting in the message, where Gradio's own
    check would say "Value 99.0 is greater than maximum value 5.0." or fail on a string."""
    name = component.label.split(" (")[0]
    if payload is None:  # a cleared box: "(got None)" meant nothing to a user
        raise page_error(f"{name} is empty: enter a number.")
    if isinstance(payload, bool) or not isinstance(payload, (int, float)) or \
            payload != payload:  # NaN
        raise page_error(f"{name} must be a number (got {payload!r})")
    low, high = component.minimum, component.maximum
    if (low is not None and payload < low) or (high is not None and payload > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise page_error(f"{name} must be {bounds} (got {payload!r})")


def checked(component):
    """``component`` (a slider or number box) with its value checked by
    :func:`_check_number_input` before Gradio's own preprocessing. Wrapped per instance,
    not subclassed: Gradio writes a stub file beside any module defining a component
    subclass."""
    preprocess = component.preprocess

    def checked_preprocess(payload):
        _check_number_input(component, payload)
        return preprocess(payload)

    component.preprocess = checked_preprocess
    return component


# --- synthesis -----------------------------------------------------------------------------


def make_params(exaggeration, cfg_weight, temperature, top_p, min_p, repetition_penalty,
                seed, max_new_tokens) -> GenerationParams:
    """UI values to params; a token budget of 0 means "derive it from the text"."""
    return GenerationParams(
        exaggeration=exaggeration, cfg_weight=cfg_weight, temperature=temperature,
        top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty,
        seed=_whole(seed, "seed"), max_new_tokens=_whole(max_new_tokens, "max_new_tokens") or None,
    )


def _whole(value, name):
    """Gradio number boxes send floats; accept 3.0 but not 3.5."""
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be a whole number (got {value})")
        return int(value)
    if value is None:
        raise ValueError(f"{name} is required")
    return value


def report_markdown(report: dict) -> str:
    t = report["timings"]
    rows = [
        ("conditioning", f"{t['conditioning_s']:.3f} s", f"voice from {report['voice']['source']}"),
        ("T3", f"{t['t3_s']:.3f} s", f"{t['t3_tokens']} tokens, {t['t3_tokens_per_s']} tokens/s"),
        ("S3Gen", f"{t['s3gen_s']:.3f} s", ""),
        ("watermark", f"{t['watermark_s']:.3f} s", ""),
        ("**total**", f"**{t['total_s']:.3f} s**",
         f"{report['audio_seconds']:.2f} s of audio, RTF {report['rtf']}"),
    ]
    if "first_audio_s" in report:
        rows.insert(0, ("**first audio**", f"**{report['first_audio_s']:.3f} s**",
                        "streamed: playback started here"))
    lines = ["| stage | time | |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    device, weights = report["device"].upper(), report["weights"]
    lines.append(f"\npreset **{html.escape(report['preset'])}** on {html.escape(device)}, "
                 f"weights {html.escape(weights)}")
    if t["build_s"] >= 0.1:
        lines.append(f"\npreparing the preset took {t['build_s']:.1f} s before the run "
                     "(building its variant; compiling and warming up, for a compiled one), "
                     "not counted above")
    return "\n".join(lines)


# Gradio re-encodes each streamed piece for the browser with ffmpeg (through pydub).
STREAMING = shutil.which("ffmpeg") is not None
STREAM_OFF_REASON = "streaming playback needs ffmpeg on the server (apt-get install ffmpeg)"
STREAM_INFO = "play audio as it is made"
STREAM_ON_CPU = f"{STREAM_INFO}; on a CPU the whole then takes longer, so it pays for a " \
                "paragraph or more"


def stream_box(device: str):
    """Stream starts ticked on CUDA only: on a CPU each streamed piece repeats S3Gen's
    seconds-long pass over the voice's reference prompt, so a sentence or two arrives
    later streamed than whole (docs/benchmarks.md, "Streaming")."""
    if not STREAMING:
        return gr.update()
    if device == "cuda":
        return gr.update(value=True, info=STREAM_INFO)
    return gr.update(value=False, info=STREAM_ON_CPU)


# The tabs' progress does not track tqdm bars (gr.Progress(track_tqdm=True)): Inductor's
# code generation opens a disabled bar per kernel and never closes it, and Gradio keeps and
# re-sends every one it tracks, so a compile under tracking grew the app from 8 GB past 16
# GB. Our own messages (preset switch, chunk by chunk) say where a run is.
@gpu_task
@user_errors
def synthesize(text: str, voice: str, preset: str, exaggeration: float, cfg_weight: float,
               temperature: float, top_p: float, min_p: float, repetition_penalty: float,
               seed: int, max_new_tokens: int, stream: bool = False,
               progress=gr.Progress()):
    """Speak ``text`` in ``voice``. Yields (result audio, timing table, full report, live
    audio): with ``stream``, each piece goes to the live player as soon as it is made,
    and the whole result comes last."""
    m = ensure_loaded(progress)
    params = make_params(exaggeration, cfg_weight, temperature, top_p, min_p,
                         repetition_penalty, seed, max_new_tokens)
    apply_s = switch_preset(m, preset, progress)

    def say(fraction, message):
        progress(fraction, desc=f"Speaking {message}")

    if not stream:
        result = m.generate_long(text, voice, params, progress=say)
        if STREAMING:
            # The live player is then a streaming output, which must be started once per
            # run (or Gradio fails the event at its end); a stream started empty makes the
            # page poll its playlist without end (hundreds of requests a second); and the
            # page drops an audio value sent in the same message as a stream's start. So
            # the whole result is the stream's one piece, and the Result follows it.
            yield gr.skip(), gr.skip(), gr.skip(), playable(result)
        count_preset_build(result.report, apply_s)
        yield playable(result), report_markdown(result.report), result.report, gr.skip()
        return
    if not STREAMING:
        raise page_error(f"Untick 'Stream': {STREAM_OFF_REASON}.")
    played = 0.0
    for chunk in m.stream(text, voice, params, progress=say):
        live = playable(chunk) if len(chunk.wav) else gr.skip()
        played += len(chunk.wav) / chunk.sample_rate
        if chunk.synthesis is None:
            yield (gr.skip(), f"Streaming chunk {chunk.chunk} of {chunk.chunks}: "
                   f"{played:.1f} s of audio so far", gr.skip(), live)
        else:
            result = chunk.synthesis
            count_preset_build(result.report, apply_s)
            yield playable(result), report_markdown(result.report), result.report, live


def switch_preset(m: ModelManager, preset: str, progress) -> float:
    """Make ``preset`` the active one, saying so when that is a switch (a compiled preset
    compiles and warms up here, minutes the first time); its seconds."""
    with m.lock:
        if m.preset != preset:
            compiles = get_preset(preset).compiles
            progress(0.0, desc=f"Switching to {preset}" + (
                ": compiling and warming up, minutes the first time"
                if compiles else ""))
        m.apply_preset(preset)
        return m.last_apply_s


def count_preset_build(report: dict, apply_s: float) -> None:
    """Add the preset's preparation before the run to the report's ``build_s``, which
    stays apart from ``total_s``."""
    report["timings"]["build_s"] += apply_s


def playable(result) -> tuple[int, np.ndarray]:
    """(rate, 16-bit samples) for gr.Audio, which would convert float itself, warning."""
    return result.sample_rate, to_pcm16(result.wav)


# --- A/B compare ---------------------------------------------------------------------------

# Every OptimizationConfig switch in the advanced panels, with its control. Numbers that
# may be "unset" use 0 for it (prompt_seconds: the whole clip; cpu_threads: torch's default).
CONFIG_CHOICES = {"t3_dtype": PRECISIONS, "t3_quant": T3_QUANTS, "t3_decoder": T3_DECODERS,
                  "s3gen_dtype": PRECISIONS, "s3gen_quant": S3GEN_QUANTS,
                  "compile_mode": COMPILE_MODES}
CONFIG_FIELDS = [f.name for f in dataclasses.fields(OptimizationConfig)]
CONFIG_HELP = {
    "cached_conditionals": "reuse the voice library's conditionals",
    "t3_dtype": "T3 precision", "t3_quant": "T3 quantization",
    "t3_onednn": "T3 float layers through oneDNN (CPU)",
    "t3_decoder": "T3 decode loop", "cuda_graphs": "T3 decode step as CUDA graphs",
    "t3_voice_prefix": "keep T3's keys and values of the voice's prompt",
    "s3gen_dtype": "CFM estimator precision", "s3gen_quant": "CFM estimator quantization",
    "cfm_steps": "CFM steps (upstream 10)", "cfm_cfg": "CFG inside the CFM",
    "cfm_parallel_rows": "CFM rows side by side, a thread each (CPU)",
    "prompt_seconds": "S3Gen prompt seconds (0 = whole clip)",
    "compile_mode": "torch.compile", "cpu_threads": "CPU threads (0 = default)",
    "tf32": "TF32 matmuls (CUDA)", "cudnn_benchmark": "cuDNN autotuning (CUDA)",
}
HISTORY_HEADERS = ["time", "text", "voice", "A", "B", "repeats", "A total s", "B total s",
                   "speedup", "B T3 tok/s", "mel SNR dB", "same tokens"]


def option_reason(name: str, value) -> str | None:
    """Why setting just ``name`` to ``value`` cannot run on this device, or None."""
    extra = {"t3_decoder": "fast"} if name in ("cuda_graphs", "t3_voice_prefix") else {}
    try:
        config = dataclasses.replace(BASELINE, **{name: value, **extra})
    except ValueError as exc:
        return str(exc)
    return unavailable_reason(config, manager().device)


def _field_values(config: OptimizationConfig) -> list:
    """The advanced panel's values for ``config`` (None shown as 0)."""
    return [(getattr(config, name) or 0) if name in ("prompt_seconds", "cpu_threads")
            else getattr(config, name) for name in CONFIG_FIELDS]


def config_from_fields(values) -> OptimizationConfig:
    """The advanced panel's values to a configuration; ``ValueError`` says what is wrong."""
    fields = dict(zip(CONFIG_FIELDS, values, strict=True))
    for name in ("prompt_seconds", "cpu_threads"):
        fields[name] = fields[name] or None
    for name in ("cfm_steps", "cpu_threads"):
        fields[name] = _whole(fields[name], name) if fields[name] is not None else None
    try:
        return OptimizationConfig(**fields)
    except ValueError as exc:
        # The configuration's bound leaves out the panel's 0, which its label offers.
        unset = {"prompt_seconds": "the whole clip", "cpu_threads": "the default"}
        name = next((name for name in unset if str(exc).startswith(name)), None)
        if name:
            raise ValueError(f"{exc}; or 0 for {unset[name]}") from None
        raise


def availability_markdown(*values) -> str:
    """One line under an advanced panel: can this configuration run here?"""
    try:
        config = config_from_fields(values)
    except ValueError as exc:
        return f"✗ not a valid configuration: {html.escape(str(exc))}"
    reason = unavailable_reason(config, manager().device)
    label = html.escape(preset_name(config))
    if reason:
        return f"✗ **{label}** cannot run on {manager().device.upper()}: {html.escape(reason)}"
    return f"✓ **{label}** runs on {manager().device.upper()}"


def preset_fields(name: str) -> list:
    """A preset picked in a dropdown fills its column's advanced panel."""
    return _field_values(get_preset(name))


class CancelRequests:
    """Which browser sessions have a comparison queued or running, and which of those asked
    to cancel it. A comparison checks between its sides: the side already generating
    finishes (the model cannot be interrupted mid-call), the next one never starts."""

    def __init__(self):
        self._lock = threading.Lock()
        self._active: set[str] = set()
        self._cancelled: set[str] = set()

    def start(self, session: str) -> None:
        with self._lock:
            # A click on Run while the session's comparison still runs (Gradio drops
            # that run) must not undo a cancel asked of the running one.
            if session not in self._active:
                self._active.add(session)
                self._cancelled.discard(session)

    def cancel(self, session: str) -> bool:
        with self._lock:
            if session in self._active:
                self._cancelled.add(session)
                return True
            return False

    def is_cancelled(self, session: str) -> bool:
        with self._lock:
            return session in self._cancelled

    def finish(self, session: str) -> None:
        with self._lock:
            self._active.discard(session)
            self._cancelled.discard(session)


CANCELS = CancelRequests()


def cancel_compare(request: gr.Request):
    if CANCELS.cancel(request.session_hash):
        return "Cancelling: the run that is generating finishes, the next one will not start."
    return gr.skip()  # nothing running: the last comparison's verdict stays


@user_errors
def collect_configs(request: gr.Request, *values) -> tuple[dict, dict]:
    """The two advanced panels as configurations, checked before the run is queued."""
    half = len(CONFIG_FIELDS)
    configs = []
    for side, side_values in (("A", values[:half]), ("B", values[half:])):
        try:
            config = config_from_fields(side_values)
        except ValueError as exc:
            raise page_error(f"Configuration {side}: {exc}") from None
        try:
            check_runnable(side, config, manager().device)
        except ValueError as exc:
            raise page_error(str(exc)) from None
        configs.append(dataclasses.asdict(config))
    CANCELS.start(request.session_hash)
    return configs[0], configs[1]


def comparison_table(result: Comparison, b_missing: str = "running…") -> list[list]:
    """The latency table, ``b_missing`` in B's column until B has run (the page's table
    would print None as null)."""
    if result.b is not None:
        return result.rows()
    return [[label, value_a, b_missing, ratio] for label, value_a, _, ratio in result.rows()]


def _bold(label: str) -> str:
    # Markdown needs no quotes escaped, and API callers would read &#x27; for them.
    return f"**{html.escape(label, quote=False)}**"


def summary_markdown(result: Comparison, label_a: str, label_b: str, repeats: int) -> str:
    """The verdict in words (Markdown): the page shows it, API callers read it."""
    if result.b is None:
        return f"A ({_bold(label_a)}) done; running B ({_bold(label_b)})…"
    speedup = result.speedup
    if not speedup:
        summary = "No timing to compare."
    else:  # "0.58x slower" said nothing: B took 1.73x as long
        times, word = (speedup, "faster") if speedup >= 1 else (1 / speedup, "slower")
        summary = (f"B ({_bold(label_b)}) ran **{times:.2f}x** {word} than A "
                   f"({_bold(label_a)}) end to end.")
    unequal = result.unequal_work
    if unequal:
        summary += (f" {unequal}: the times cover unequal work, so compare the RTF "
                    "(seconds per second of audio).")
    if result.runs < repeats:
        summary += (f" Cancelled after {result.runs} of {repeats} runs per side: the "
                    "figures are over those.")
    reading = html.escape(result.fidelity.reading(), quote=False)
    return f"{summary}\n\n**Fidelity of B against A:** {reading}"


def comparison_outputs(result: Comparison, label_a: str, label_b: str,
                       repeats: int = 1) -> tuple:
    """Audio A, audio B, table, summary, chart, spectrograms for a (partial) comparison."""
    b = result.audio_b
    return (playable(result.audio_a), playable(b) if b else None, comparison_table(result),
            summary_markdown(result, label_a, label_b, repeats), result.chart(),
            result.spectrograms())


def history_row(text: str, voice: str, label_a: str, label_b: str,
                result: Comparison) -> list:
    fidelity = result.fidelity
    snr = fidelity.mel_snr_db
    return [time.strftime("%H:%M:%S"), text, voice, label_a, label_b, result.runs,
            result.a["total_s"], result.b["total_s"], result.speedup,
            result.b.get("t3_tokens_per_s"), "inf" if math.isinf(snr) else round(snr, 1),
            fidelity.same_tokens]


def history_view(rows: list[list], text_chars: int = 40) -> list[list]:
    """The rows as the page's table shows them: the text cut short to keep a row on one
    line. The CSV download keeps the whole text (it kept these 40 characters only)."""
    return [[row[0], row[1] if len(row[1]) <= text_chars else row[1][:text_chars - 1] + "…",
             *row[2:]] for row in rows]


HISTORY_DIR = Path(tempfile.gettempdir()) / f"chatterbox-ab-history-{os.getpid()}"


def history_csv(rows: list[list]) -> str:
    """The page's run history as a CSV file Gradio can serve (Gradio serves its own copy,
    so ours are deleted after UPLOAD_TTL_S like the uploads)."""
    HISTORY_DIR.mkdir(exist_ok=True)
    expired = time.time() - UPLOAD_TTL_S
    for old in HISTORY_DIR.iterdir():
        if old.stat().st_mtime < expired:
            shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(dir=HISTORY_DIR)) / "ab-history.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(HISTORY_HEADERS)
        writer.writerows(rows)
    return str(path)


@gpu_task
@user_errors
def run_compare(text: str, voice: str, seed: int, max_new_tokens: int, preset_a: str,
                preset_b: str, repeats: int = 1, config_a: dict | None = None,
                config_b: dict | None = None, history: list | None = None,
                request: gr.Request = None, progress=gr.Progress()):
    """Same text, voice, seed and token budget under A then B (presets, or the advanced
    panels' configurations when the page sends them); yields A's result, then both."""
    session = request.session_hash if request else None
    try:
        yield from _run_compare(text, voice, seed, max_new_tokens, preset_a, preset_b,
                                repeats, config_a, config_b, history, session, progress)
    finally:
        CANCELS.finish(session)


def _run_compare(text, voice, seed, max_new_tokens, preset_a, preset_b, repeats, config_a,
                 config_b, history, session, progress):
    m = ensure_loaded(progress)
    params = make_params(None, 0.5, 0.8, 1.0, 0.05, 1.2, seed, max_new_tokens)
    repeats = _whole(repeats, "repeats")
    if not 1 <= repeats <= 5:
        raise ValueError(f"repeats must be between 1 and 5 (got {repeats})")
    a = OptimizationConfig(**config_a) if config_a else get_preset(preset_a)
    b = OptimizationConfig(**config_b) if config_b else get_preset(preset_b)
    label_a, label_b = preset_name(a), preset_name(b)
    history = list(history or [])
    steps = compare_steps(m, text, voice, params, a, b, repeats,
                          progress=lambda fraction, message: progress(fraction, desc=message),
                          cancelled=lambda: CANCELS.is_cancelled(session))
    csv_file = history_csv(history) if history else None
    a_done = False
    try:
        for result in steps:
            outputs = comparison_outputs(result, label_a, label_b, repeats)
            if result.b is not None:
                history.append(history_row(text, voice, label_a, label_b, result))
                csv_file = history_csv(history)
            yield (*outputs, history_view(history), history, csv_file)
            a_done = True
    except Exception:
        # The error itself becomes the page's message; the summary and B's column must not
        # go on saying "running B…" (or show an earlier comparison's verdict) beside it.
        if a_done:
            stopped = f"A ({_bold(label_a)}) done; B ({_bold(label_b)}) failed: see the message."
            table = comparison_table(result, "failed")
            yield (*[gr.skip()] * 2, table, stopped, *[gr.skip()] * 5)
        else:  # nothing of this comparison to show, and an earlier one's would mislead
            yield (None, None, [], "The comparison stopped: see the message.", None, None,
                   *[gr.skip()] * 3)
        raise
    if result.b is None:
        audio_a, _, _, _, chart, mels = outputs
        cancelled = f"Cancelled after A ({_bold(label_a)}): B did not run."
        yield (audio_a, None, comparison_table(result, "not run"), cancelled, chart, mels,
               history_view(history), history, csv_file)


# --- layout --------------------------------------------------------------------------------


def _setting_sliders():
    defaults = GenerationParams()

    def slider(name, value, step, label=None):
        return checked(gr.Slider(*RANGES[name], value=value, step=step, label=label or name))

    with gr.Accordion("Generation settings", open=False):
        exaggeration = slider("exaggeration", 0.5, 0.05, "exaggeration (emotion intensity)")
        cfg_weight = slider("cfg_weight", defaults.cfg_weight, 0.05,
                            "cfg_weight (guidance; 0 turns CFG off)")
        temperature = slider("temperature", defaults.temperature, 0.05)
        top_p = slider("top_p", defaults.top_p, 0.01)
        min_p = slider("min_p", defaults.min_p, 0.01)
        repetition_penalty = slider("repetition_penalty", defaults.repetition_penalty, 0.05)
        with gr.Row():
            seed = checked(gr.Number(value=0, precision=0, label="seed", minimum=0))
            max_new_tokens = checked(gr.Number(
                value=0, precision=0, minimum=0, maximum=RANGES["max_new_tokens"][1],
                label="max_new_tokens (0 = from text length; 25 per second)"))
    return [exaggeration, cfg_weight, temperature, top_p, min_p, repetition_penalty, seed,
            max_new_tokens]


def _preset_dropdown(label: str, value: str) -> gr.Dropdown:
    return gr.Dropdown(list(PRESETS), value=value, label=label)


def _config_panel(side: str, preset: str):
    """A preset dropdown plus an "advanced" panel with every switch; options this device
    cannot run are marked with the reason (and refused if chosen)."""
    dropdown = _preset_dropdown(f"{side}: preset", preset)
    values = dict(zip(CONFIG_FIELDS, _field_values(get_preset(preset)), strict=True))
    fields = []
    with gr.Accordion(f"{side}: advanced (every switch)", open=False):
        for name in CONFIG_FIELDS:
            label = f"{name}: {CONFIG_HELP[name]}"
            value = values[name]
            if name in CONFIG_CHOICES:
                choices = []
                for option in CONFIG_CHOICES[name]:
                    reason = option_reason(name, option)
                    shown = f"{option} (unavailable: {reason})" if reason else option
                    if (option == "bf16" and not reason and not CPU_BF16
                            and manager().device == "cpu"):
                        shown = "bf16 (emulated on this CPU: slower than fp32)"
                    choices.append((shown, option))
                field = gr.Dropdown(choices, value=value, label=label)
            elif isinstance(value, bool):
                reason = option_reason(name, True)
                field = gr.Checkbox(value=value, label=label, interactive=reason is None,
                                    info=f"unavailable: {reason}" if reason else None)
            elif name == "cfm_steps":
                field = gr.Slider(1, 50, value=value, step=1, label=label)
            elif name == "prompt_seconds":
                field = gr.Slider(0, 10, value=value, step=0.5, label=label)
            else:
                field = gr.Number(value=value, precision=0, minimum=0, label=label)
            if isinstance(field, (gr.Slider, gr.Number)):
                # OptimizationConfig checks these, and the messages name the side and the
                # field; Gradio's own bound check named neither ("Value -1 is less than
                # minimum value 0.") and stopped the line under the panel from saying so.
                field.preprocess = lambda payload: payload
            fields.append(field)
    availability = gr.Markdown(availability_markdown(*_field_values(get_preset(preset))))
    return dropdown, fields, availability


def preset_markdown(name: str) -> str:
    """One line under the Synthesize tab's preset picker: what it does, whether it runs."""
    if name not in PRESETS:
        return ""
    reason = manager().unavailable_presets().get(name)
    here = f" — unavailable here: {html.escape(reason)}" if reason else ""
    return f"`{name}`: {html.escape(PRESET_DESCRIPTIONS[name])}{here}"


def presets_markdown() -> str:
    """Every preset, what it does, and whether it can run on this device (and why not)."""
    reasons = manager().unavailable_presets()
    emulated = manager().device == "cpu" and not CPU_BF16
    lines = ["| preset | what it does | here |", "|---|---|---|"]
    for name in PRESETS:
        reason = reasons.get(name)
        here = f"unavailable: {html.escape(reason)}" if reason else "available"
        if not reason and emulated and "bf16" in (PRESETS[name].t3_dtype,
                                                  PRESETS[name].s3gen_dtype):
            here = "available, but bf16 is emulated on this CPU: slower than fp32"
        lines.append(f"| `{name}` | {html.escape(PRESET_DESCRIPTIONS[name])} | {here} |")
    return "\n".join(lines)


def build_demo() -> gr.Blocks:
    with gr.Blocks(title=TITLE, delete_cache=(UPLOAD_SWEEP_S, UPLOAD_TTL_S)) as demo:
        gr.Markdown(f"## {TITLE}")
        header = gr.HTML("<div id='status-line'>loading the model…</div>")

        with gr.Tab("Voices", elem_id="voices-tab"):
            with gr.Row():
                with gr.Column():
                    audio_in = gr.Audio(sources=["upload", "microphone"], type="filepath",
                                        label="Reference clip: 5-10 s of one person speaking")
                    name_in = gr.Textbox(label="Name", max_lines=1, placeholder="e.g. narrator")
                    voice_exag = checked(gr.Slider(*RANGES["exaggeration"], value=0.5,
                                                   step=0.05, label="exaggeration"))
                    add_btn = gr.Button("Add voice", variant="primary")
                    voice_status = gr.Markdown()
                with gr.Column():
                    table = gr.Dataframe(headers=VOICE_HEADERS, interactive=False,
                                         label="Voice library", elem_id="voice-table")
                    mine = gr.Dropdown([], label="Your voices (shipped ones are read-only)",
                                       allow_custom_value=True)
                    with gr.Row():
                        new_name = gr.Textbox(label="New name", max_lines=1, scale=2)
                        rename_btn = gr.Button("Rename", scale=1)
                        remove_btn = gr.Button("Remove", variant="stop", scale=1)
                    # Shown by Remove; its "Yes" removes the voice the question names,
                    # even if the picker has changed since. The question stays on the
                    # page, empty until asked: written while hidden, Gradio 6.8 showed it
                    # the first time under a "processing" timer that never stopped.
                    removal_question = gr.Markdown(elem_id="removal-question")
                    with gr.Row(visible=False, elem_id="confirm-removal") as removal_row:
                        removal_name = gr.Textbox(visible=False, label="name")
                        yes_remove_btn = gr.Button("Yes, remove it", variant="stop",
                                                   scale=0)
                        keep_btn = gr.Button("Keep it", scale=0)
            with gr.Accordion("Fine-tune a voice (docs/finetuning.md)", open=False):
                gr.Markdown("A zip of one speaker's clips with transcripts (`metadata.csv` + "
                            "`wavs/`, or `NAME.wav` + `NAME.txt`). Real use wants 30-60 "
                            "minutes of clean speech and a GPU; on a CPU keep it to a few "
                            "dozen steps. Or import an adapter directory (zipped) that "
                            "`python -m chatterbox_demo finetune train` wrote.")
                with gr.Row():
                    with gr.Column():
                        dataset_in = gr.File(label="Dataset (.zip)", file_types=[".zip"],
                                             type="filepath", elem_id="tune-data")
                        tune_name = gr.Textbox(label="Voice name", max_lines=1,
                                               elem_id="tune-name")
                        with gr.Row():
                            tune_method = gr.Radio(list(METHODS), value="lora",
                                                   label="method")
                            # No maximum here: finetune_voice's own refusal says
                            # what to use for longer runs, Gradio's only the bound.
                            tune_steps = checked(gr.Number(
                                value=50, precision=0, minimum=1,
                                label=f"steps (up to {PAGE_MAX_STEPS} here)"))
                        tune_btn = gr.Button("Fine-tune", variant="primary")
                    with gr.Column():
                        adapter_in = gr.File(label="Adapter directory (.zip)",
                                             file_types=[".zip"], type="filepath",
                                             elem_id="adapter-zip")
                        adapter_name = gr.Textbox(label="Voice name", max_lines=1,
                                                  elem_id="adapter-name")
                        import_btn = gr.Button("Import adapter")
                tune_status = gr.Markdown(elem_id="tune-status")

        with gr.Tab("Synthesize"):
            with gr.Row():
                with gr.Column():
                    text = gr.Textbox(label="Text", lines=4,
                                      value="Hello! This is Chatterbox speaking in a cloned voice.")
                    with gr.Row():
                        voice = gr.Dropdown([], label="Voice", allow_custom_value=True)
                        preset = _preset_dropdown("Optimization preset", DEFAULT_PRESET)
                    preset_line = gr.Markdown(preset_markdown(DEFAULT_PRESET),
                                              elem_id="preset-line")
                    settings = _setting_sliders()
                    # Built unticked: the page-load event ticks it on CUDA (stream_box)
                    # once the model is loaded, so a click during the first load does
                    # not stream on a CPU.
                    stream = gr.Checkbox(
                        value=False, interactive=STREAMING, label="Stream",
                        info=STREAM_INFO if STREAMING else STREAM_OFF_REASON)
                    synth_btn = gr.Button("Synthesize", variant="primary")
                with gr.Column():
                    # A plain player without ffmpeg: a streaming one would be started
                    # and left empty (see synthesize). Gradio 6.8's player attaches only
                    # the first stream of a page (gradio-app/gradio#13807): a run starts
                    # by clearing it (below), and without the live waveform, as that
                    # issue advises; with either alone a second run stayed silent here.
                    live_out = gr.Audio(
                        label="Live playback", streaming=STREAMING, autoplay=True,
                        interactive=False, elem_id="live-audio",
                        waveform_options=gr.WaveformOptions(show_recording_waveform=False))
                    audio_out = gr.Audio(label="Result", type="numpy", interactive=False)
                    timings = gr.Markdown()
                    with gr.Accordion("Full report (JSON)", open=False):
                        report = gr.JSON()

        with gr.Tab("A/B Compare"):
            ab_text = gr.Textbox(label="Text", lines=3,
                                 value="The quick brown fox jumps over the lazy dog.")
            with gr.Row():
                ab_voice = gr.Dropdown([], label="Voice", allow_custom_value=True)
                ab_seed = checked(gr.Number(value=0, precision=0, minimum=0, label="seed"))
                ab_tokens = checked(gr.Number(value=0, precision=0, minimum=0,
                                              maximum=RANGES["max_new_tokens"][1],
                                              label="max_new_tokens (0 = from text length)"))
                ab_repeats = checked(gr.Slider(1, 5, value=1, step=1,
                                               label="repeats per side (medians reported)"))
            with gr.Row():
                with gr.Column(min_width=300):
                    preset_a, fields_a, avail_a = _config_panel("A", "baseline")
                    audio_a = gr.Audio(label="A", type="numpy", interactive=False,
                                       elem_id="audio-a")
                with gr.Column(min_width=300):
                    preset_b, fields_b, avail_b = _config_panel("B", DEFAULT_PRESET)
                    audio_b = gr.Audio(label="B", type="numpy", interactive=False,
                                       elem_id="audio-b")
            with gr.Accordion("What the presets do", open=False):
                presets_info = gr.Markdown()
            with gr.Row():
                ab_btn = gr.Button("Run A then B", variant="primary", scale=3)
                cancel_btn = gr.Button("Cancel", variant="stop", scale=1)
            ab_summary = gr.Markdown(elem_id="ab-summary", label="Summary")
            ab_table = gr.Dataframe(headers=TABLE_HEADERS,
                                    interactive=False, label="Latency", elem_id="ab-table")
            with gr.Row():
                ab_chart = gr.Plot(label="Seconds per stage", elem_id="ab-chart")
                ab_mels = gr.Plot(label="Mel spectrograms", elem_id="ab-mels")
            # Widths that fit each header, the text's wrapped: shared out, the twelve
            # columns were cut to a few letters each ("03:05:1", "baseli") even at 1400 px.
            # A narrower window scrolls the table sideways.
            history_table = gr.Dataframe(
                headers=HISTORY_HEADERS, interactive=False, wrap=True,
                column_widths=[f"{px}px" for px in (85, 150, 100, 95, 95, 80, 100, 100, 85,
                                                     110, 110, 110)],
                label="Runs since this page was opened", elem_id="ab-history")
            history_file = gr.DownloadButton("Download history (CSV)", value=None,
                                             elem_id="ab-history-csv")
            history = gr.State([])
            config_a_state, config_b_state = gr.State(None), gr.State(None)

        refresh = dict(fn=refresh_voice_pickers, inputs=[voice, ab_voice, mine, voice_status],
                       outputs=[voice, ab_voice, mine, voice_status],
                       api_visibility="private", queue=False)

        demo.load(startup, outputs=[header, table, preset, preset_b, presets_info, stream],
                  api_visibility="private",
                  concurrency_id=MODEL_SLOT).then(**refresh)
        follow = dict(outputs=[voice, ab_voice, mine], api_visibility="private", queue=False)
        # The page asks before removing (removal_row); API callers name the voice in one
        # call to the same endpoint. (Closing it from the chains after a rename or an add
        # left Gradio 6.8 unable to show it again: only its own buttons open and close it.)
        hide_removal = dict(fn=hide_removal_question, outputs=[removal_row, removal_question],
                            api_visibility="private", queue=False)
        # What fails shows its message as a notice; the error badge goes on the status
        # line only, not over the voice table, which keeps showing the library.
        voices_event = dict(concurrency_id=MODEL_SLOT, show_progress_on=voice_status)
        add_btn.click(add_voice, [audio_in, name_in, voice_exag], [voice_status, table],
                      api_name="add_voice", **voices_event).success(
                      follow_voice, [name_in, voice, ab_voice], **follow).then(**refresh)
        # The question first, then its buttons: see removal_question.
        remove_btn.click(ask_to_remove, [mine], [removal_question, removal_name],
                         api_visibility="private").success(
                         show_removal_buttons, None, removal_row, api_visibility="private",
                         queue=False)
        keep_btn.click(**hide_removal)
        yes_remove_btn.click(**hide_removal)  # answered, whether the removal works or not
        yes_remove_btn.click(remove_voice, [removal_name], [voice_status, table],
                             api_name="remove_voice", **voices_event).then(**refresh)
        rename_btn.click(rename_voice, [mine, new_name], [voice_status, table],
                         api_name="rename_voice", **voices_event).success(
                         follow_voice, [new_name, voice, ab_voice, mine], **follow,
                         ).then(**refresh)
        # Training runs on a copy of T3 outside the model's lock: its own queue slot, so
        # generation goes on meanwhile.
        tune_btn.click(finetune_voice, [dataset_in, tune_name, tune_method, tune_steps],
                       [tune_status, table, tune_name], api_name="finetune",
                       concurrency_id="finetune", show_progress_on=tune_status).success(
                       follow_voice, [tune_name, voice, ab_voice], **follow).then(**refresh)
        import_btn.click(import_adapter, [adapter_in, adapter_name], [tune_status, table],
                         api_name="import_adapter", concurrency_id=MODEL_SLOT,
                         show_progress_on=tune_status).success(
                         follow_voice, [adapter_name, voice, ab_voice], **follow,
                         ).then(**refresh)
        preset.change(preset_markdown, preset, preset_line, api_visibility="private",
                      queue=False)
        # A voice's saved exaggeration becomes the slider's value when it is picked.
        voice.change(voice_exaggeration, voice, settings[0], api_visibility="private",
                     queue=False)
        # The timed events show Gradio's small progress (a timer and our messages) on one
        # output, not its default animated loader on every output: a browser on the app's
        # own 2-core machine spent half a core drawing those and slowed the run it timed
        # by about 1.5-1.75x (docs/benchmarks.md, "A browser on the same machine").
        synth_btn.click(lambda: None, outputs=live_out, queue=False,  # see live_out
                        api_visibility="private").then(
                        synthesize, [text, voice, preset, *settings, stream],
                        [audio_out, timings, report, live_out], api_name="synthesize",
                        show_progress="minimal", show_progress_on=audio_out,
                        concurrency_id=MODEL_SLOT).then(header_html, outputs=header,
                                                        api_visibility="private", queue=False)
        for preset_dd, fields, avail in ((preset_a, fields_a, avail_a),
                                         (preset_b, fields_b, avail_b)):
            preset_dd.change(preset_fields, preset_dd, fields, api_visibility="private",
                             queue=False)
            for field in fields:
                field.change(availability_markdown, fields, avail, api_visibility="private",
                             queue=False)
        # The panels are checked (and turned into configurations) before the run, in a
        # step of their own; API callers skip it and name presets instead. Queued: the
        # error of an unqueued step reached the browser as a bare 500, and the page showed
        # nothing at all.
        ab_btn.click(
            collect_configs, [*fields_a, *fields_b], [config_a_state, config_b_state],
            api_visibility="private",
        ).success(
            run_compare,
            [ab_text, ab_voice, ab_seed, ab_tokens, preset_a, preset_b, ab_repeats,
             config_a_state, config_b_state, history],
            [audio_a, audio_b, ab_table, ab_summary, ab_chart, ab_mels, history_table,
             history, history_file],
            api_name="compare", concurrency_id=MODEL_SLOT,
            show_progress="minimal", show_progress_on=[audio_a, audio_b],
        ).then(header_html, outputs=header, api_visibility="private", queue=False)  # notices
        cancel_btn.click(cancel_compare, None, ab_summary, api_visibility="private",
                         queue=False)
        gr.api(list_voices, api_name="list_voices")
    return demo


@user_errors
def startup(progress=gr.Progress()):
    m = ensure_loaded(progress)
    # The preset the server started on, not the one its last user switched to: a page
    # opened after someone ran baseline offered baseline, and A/B then baseline twice.
    return (header_html(), voice_table(), m.start_preset, m.start_preset, presets_markdown(),
            stream_box(m.device))


def launch(demo: gr.Blocks, routers=(), **kwargs) -> None:
    """Start loading the model at once (the first page view then finds it ready) and serve,
    with ``routers`` (FastAPI routers, such as the OpenAI-compatible API) on the same server.

    Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, defaulting to
    127.0.0.1:7860: the app is reachable from this machine only unless told otherwise.
    """
    threading.Thread(target=_load_in_background, daemon=True).start()
    demo.queue(max_size=queue_max(), default_concurrency_limit=1)
    # Enforced by the server at upload, before any of our code sees the file.
    kwargs.setdefault("max_file_size", f"{MAX_UPLOAD_BYTES // 2**20}mb")
    app, _, _ = demo.launch(prevent_thread_lock=True, **kwargs)
    for router in routers:
        app.include_router(router)
    demo.block_thread()


def _load_in_background() -> None:
    try:
        manager().load()
    except Exception:  # the page shows the same error when it asks for the model
        log.exception("Loading the model failed")
