"""The Gradio app: Voices, Synthesize and A/B Compare tabs. The only module importing gradio.

Every handler goes through the process-wide :class:`ModelManager`; nothing model-sized is
kept per browser session. Model-bound events share one concurrency slot, so one generation
runs on the model at a time and the rest wait in the queue with their position shown.
"""

from __future__ import annotations

import functools
import html
import logging
import threading

import gradio as gr

from .compare import compare
from .config import (
    DEFAULT_PRESET,
    PRESET_DESCRIPTIONS,
    PRESETS,
    RANGES,
    GenerationParams,
    get_preset,
)
from .manager import ModelManager
from .pipeline import GenerationError

log = logging.getLogger(__name__)

USER_ERRORS = (ValueError, FileNotFoundError, GenerationError)
MODEL_SLOT = "model"  # concurrency_id shared by every event that runs the model
QUEUE_MAX = 32
TITLE = "Chatterbox TTS: clone, synthesize, compare"


def user_errors(fn):
    """Turn errors a user caused into a readable message in the page; log the rest and
    show a short notice instead of a stack trace."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:
            log.exception("Unexpected error in %s", fn.__name__)
            raise gr.Error(f"Something went wrong ({type(exc).__name__}); "
                           "the server log has the details.", print_exception=False) from None

    return wrapper


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
    for notice in manager().notices[-3:]:
        banner += (f"<div class='notice' style='padding:4px 12px;margin-bottom:4px;"
                   f"border-radius:6px;background:#e7f1ff;'>{html.escape(notice)}</div>")
    if status["banner"]:
        banner = (f"<div id='offline-banner' style='padding:8px 12px;margin-bottom:6px;"
                  f"border-radius:6px;background:#fff3cd;color:#664d03;'>"
                  f"{html.escape(status['banner'])}</div>")
    return f"{banner}<div id='status-line'>{line}</div>"


# --- voices --------------------------------------------------------------------------------

VOICE_HEADERS = ["name", "kind", "exaggeration", "seconds"]


def voice_table() -> list[list]:
    return [[v.name, v.kind, v.exaggeration, v.seconds] for v in manager().list_voices()]


def voice_choices() -> tuple[list[str], list[str]]:
    """(all voice names, the names a user may rename or remove)."""
    voices = manager().list_voices()
    return [v.name for v in voices], [v.name for v in voices if v.kind == "user"]


@user_errors
def list_voices() -> list[list]:
    """All voices as rows of name, kind, exaggeration, seconds."""
    ensure_loaded()
    return voice_table()


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
def rename_voice(name: str, new_name: str) -> tuple[str, list[list]]:
    voice = ensure_loaded().rename_voice(name, new_name)
    return f"Renamed to **{html.escape(voice.name)}**.", voice_table()


def refresh_voice_pickers(current_synth: str | None, current_ab: str | None):
    names, removable = voice_choices()
    pick = lambda current: current if current in names else (names[0] if names else None)  # noqa: E731
    return (gr.update(choices=names, value=pick(current_synth)),
            gr.update(choices=names, value=pick(current_ab)),
            gr.update(choices=removable, value=removable[0] if removable else None))


def voice_exaggeration(name: str | None):
    m = manager()
    if m.loaded is None or not name:
        return gr.update()
    try:
        return m.library.get(name).exaggeration
    except ValueError:
        return gr.update()


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
    if isinstance(value, float) and value.is_integer():
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
    lines = ["| stage | time | |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    device, weights = report["device"].upper(), report["weights"]
    lines.append(f"\npreset **{html.escape(report['preset'])}** on {html.escape(device)}, "
                 f"weights {html.escape(weights)}")
    return "\n".join(lines)


@user_errors
def synthesize(text: str, voice: str, preset: str, exaggeration: float, cfg_weight: float,
               temperature: float, top_p: float, min_p: float, repetition_penalty: float,
               seed: int, max_new_tokens: int, progress=gr.Progress(track_tqdm=True)):
    """Speak ``text`` in ``voice``; returns (audio, timing table, full report)."""
    m = ensure_loaded(progress)
    params = make_params(exaggeration, cfg_weight, temperature, top_p, min_p,
                         repetition_penalty, seed, max_new_tokens)
    m.apply_preset(preset)
    result = m.generate(text, voice, params)
    return (result.sample_rate, result.wav), report_markdown(result.report), result.report


@user_errors
def run_compare(text: str, voice: str, seed: int, max_new_tokens: int, preset_a: str,
                preset_b: str, progress=gr.Progress(track_tqdm=True)):
    """Same text, voice, seed and token budget under presets A and B."""
    m = ensure_loaded(progress)
    params = make_params(None, 0.5, 0.8, 1.0, 0.05, 1.2, seed, max_new_tokens)
    result = compare(m, text, voice, params, get_preset(preset_a), get_preset(preset_b))
    speedup = result.speedup
    summary = (f"B (**{html.escape(preset_b)}**) ran **{speedup:.2f}x** "
               f"{'faster' if speedup >= 1 else 'slower'} than A "
               f"(**{html.escape(preset_a)}**) end to end."
               if speedup else "No timing to compare.")
    a, b = result.audio_a, result.audio_b
    return (a.sample_rate, a.wav), (b.sample_rate, b.wav), result.rows(), summary


# --- layout --------------------------------------------------------------------------------


def _setting_sliders():
    defaults = GenerationParams()
    with gr.Accordion("Generation settings", open=False):
        exaggeration = gr.Slider(*RANGES["exaggeration"], value=0.5, step=0.05,
                                 label="exaggeration (emotion intensity)")
        cfg_weight = gr.Slider(*RANGES["cfg_weight"], value=defaults.cfg_weight, step=0.05,
                               label="cfg_weight (guidance; 0 turns CFG off)")
        temperature = gr.Slider(*RANGES["temperature"], value=defaults.temperature, step=0.05,
                                label="temperature")
        top_p = gr.Slider(*RANGES["top_p"], value=defaults.top_p, step=0.01, label="top_p")
        min_p = gr.Slider(*RANGES["min_p"], value=defaults.min_p, step=0.01, label="min_p")
        repetition_penalty = gr.Slider(*RANGES["repetition_penalty"],
                                       value=defaults.repetition_penalty, step=0.05,
                                       label="repetition_penalty")
        with gr.Row():
            seed = gr.Number(value=0, precision=0, label="seed", minimum=0)
            max_new_tokens = gr.Number(value=0, precision=0, minimum=0,
                                       maximum=RANGES["max_new_tokens"][1],
                                       label="max_new_tokens (0 = from text length; 25 per second)")
    return [exaggeration, cfg_weight, temperature, top_p, min_p, repetition_penalty, seed,
            max_new_tokens]


def _preset_dropdown(label: str, value: str) -> gr.Dropdown:
    return gr.Dropdown(list(PRESETS), value=value, label=label)


def presets_markdown() -> str:
    """Every preset, what it does, and whether it can run on this device (and why not)."""
    reasons = manager().unavailable_presets()
    lines = ["| preset | what it does | here |", "|---|---|---|"]
    for name in PRESETS:
        reason = reasons.get(name)
        here = f"unavailable: {html.escape(reason)}" if reason else "available"
        lines.append(f"| `{name}` | {html.escape(PRESET_DESCRIPTIONS[name])} | {here} |")
    return "\n".join(lines)


def build_demo() -> gr.Blocks:
    with gr.Blocks(title=TITLE) as demo:
        gr.Markdown(f"## {TITLE}")
        header = gr.HTML("<div id='status-line'>loading the model…</div>")

        with gr.Tab("Voices"):
            with gr.Row():
                with gr.Column():
                    audio_in = gr.Audio(sources=["upload", "microphone"], type="filepath",
                                        label="Reference clip: 5-10 s of one person speaking")
                    name_in = gr.Textbox(label="Name", max_lines=1, placeholder="e.g. narrator")
                    voice_exag = gr.Slider(*RANGES["exaggeration"], value=0.5, step=0.05,
                                           label="exaggeration")
                    add_btn = gr.Button("Add voice", variant="primary")
                    voice_status = gr.Markdown()
                with gr.Column():
                    table = gr.Dataframe(headers=VOICE_HEADERS, interactive=False,
                                         label="Voice library")
                    mine = gr.Dropdown([], label="Your voices (shipped ones are read-only)",
                                       allow_custom_value=True)
                    with gr.Row():
                        new_name = gr.Textbox(label="New name", max_lines=1, scale=2)
                        rename_btn = gr.Button("Rename", scale=1)
                        remove_btn = gr.Button("Remove", variant="stop", scale=1)

        with gr.Tab("Synthesize"):
            with gr.Row():
                with gr.Column():
                    text = gr.Textbox(label="Text", lines=4,
                                      value="Hello! This is Chatterbox speaking in a cloned voice.")
                    with gr.Row():
                        voice = gr.Dropdown([], label="Voice", allow_custom_value=True)
                        preset = _preset_dropdown("Optimization preset", DEFAULT_PRESET)
                    settings = _setting_sliders()
                    synth_btn = gr.Button("Synthesize", variant="primary")
                with gr.Column():
                    audio_out = gr.Audio(label="Result", type="numpy", interactive=False)
                    timings = gr.Markdown()
                    with gr.Accordion("Full report (JSON)", open=False):
                        report = gr.JSON()

        with gr.Tab("A/B Compare"):
            ab_text = gr.Textbox(label="Text", lines=3,
                                 value="The quick brown fox jumps over the lazy dog.")
            with gr.Row():
                ab_voice = gr.Dropdown([], label="Voice", allow_custom_value=True)
                ab_seed = gr.Number(value=0, precision=0, minimum=0, label="seed")
                ab_tokens = gr.Number(value=0, precision=0, minimum=0,
                                      maximum=RANGES["max_new_tokens"][1],
                                      label="max_new_tokens (0 = from text length)")
            with gr.Row():
                with gr.Column():
                    preset_a = _preset_dropdown("A", "baseline")
                    audio_a = gr.Audio(label="A", type="numpy", interactive=False)
                with gr.Column():
                    preset_b = _preset_dropdown("B", DEFAULT_PRESET)
                    audio_b = gr.Audio(label="B", type="numpy", interactive=False)
            with gr.Accordion("What the presets do", open=False):
                presets_info = gr.Markdown()
            ab_btn = gr.Button("Run A then B", variant="primary")
            ab_summary = gr.Markdown()
            ab_table = gr.Dataframe(headers=["", "A", "B", "speedup (A/B)"],
                                    interactive=False, label="Latency")

        refresh = dict(fn=refresh_voice_pickers, inputs=[voice, ab_voice],
                       outputs=[voice, ab_voice, mine], api_visibility="private", queue=False)

        demo.load(startup, outputs=[header, table, preset, preset_b, presets_info],
                  api_visibility="private",
                  concurrency_id=MODEL_SLOT).then(**refresh)
        add_btn.click(add_voice, [audio_in, name_in, voice_exag], [voice_status, table],
                      api_name="add_voice", concurrency_id=MODEL_SLOT).then(**refresh)
        remove_btn.click(remove_voice, [mine], [voice_status, table],
                         api_name="remove_voice", concurrency_id=MODEL_SLOT).then(**refresh)
        rename_btn.click(rename_voice, [mine, new_name], [voice_status, table],
                         api_name="rename_voice", concurrency_id=MODEL_SLOT).then(**refresh)
        # A voice's saved exaggeration becomes the slider's value when it is picked.
        voice.change(voice_exaggeration, voice, settings[0], api_visibility="private",
                     queue=False)
        synth_btn.click(synthesize, [text, voice, preset, *settings],
                        [audio_out, timings, report], api_name="synthesize",
                        concurrency_id=MODEL_SLOT).then(header_html, outputs=header,
                                                        api_visibility="private", queue=False)
        ab_btn.click(run_compare, [ab_text, ab_voice, ab_seed, ab_tokens, preset_a, preset_b],
                     [audio_a, audio_b, ab_table, ab_summary], api_name="compare",
                     concurrency_id=MODEL_SLOT)
        gr.api(list_voices, api_name="list_voices")
    return demo


@user_errors
def startup(progress=gr.Progress()):
    m = ensure_loaded(progress)
    return header_html(), voice_table(), m.preset, m.preset, presets_markdown()


def launch(demo: gr.Blocks, **kwargs) -> None:
    """Start loading the model at once (the first page view then finds it ready) and serve.

    Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, defaulting to
    127.0.0.1:7860: the app is reachable from this machine only unless told otherwise.
    """
    threading.Thread(target=_load_in_background, daemon=True).start()
    demo.queue(max_size=QUEUE_MAX, default_concurrency_limit=1)
    demo.launch(**kwargs)


def _load_in_background() -> None:
    try:
        manager().load()
    except Exception:  # the page shows the same error when it asks for the model
        log.exception("Loading the model failed")
