"""app.py started as a real server on a free port and driven over HTTP with gradio_client."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import soundfile as sf
from app_server import ROOT, running_app
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

VOICE_CLIP = ROOT / "voices" / "calm-mid.wav"
UPLOAD_TTL_S = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("http")
    with running_app(workdir, CHATTERBOX_UPLOAD_TTL=str(UPLOAD_TTL_S)) as (url, port, _):
        yield url, port, workdir


@pytest.fixture(scope="module")
def client(server):
    return Client(server[0], verbose=False)


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on ``port``, from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_listens_on_loopback_only(server):
    # 0100007F is 127.0.0.1 in /proc's little-endian hex; 0.0.0.0 would be 00000000.
    assert listening_addresses(server[1]) == {"0100007F"}


def synth_args(text: str, voice: str, seed: int = 1, max_new_tokens: int = 40,
               stream: bool = False):
    # text, voice, preset, exaggeration, cfg_weight, temperature, top_p, min_p,
    # repetition_penalty, seed, max_new_tokens, stream
    return (text, voice, "cached", 0.5, 0.5, 0.8, 1.0, 0.05, 1.2, seed, max_new_tokens,
            stream)


def test_names_its_endpoints_and_parameters(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in ("/synthesize", "/add_voice", "/remove_voice", "/rename_voice",
                 "/list_voices", "/compare"):
        assert name in endpoints
    params = [p["parameter_name"] for p in endpoints["/synthesize"]["parameters"]]
    assert params[:2] == ["text", "voice"] and "seed" in params and "max_new_tokens" in params


def test_synthesize_returns_audio_and_report(client):
    audio, table, report, _ = client.predict(*synth_args("Hello from the test.", "calm-mid"),
                                                api_name="/synthesize")
    samples, rate = sf.read(audio)
    assert rate == 24000 and len(samples) > 0
    assert report["voice"]["name"] == "calm-mid"
    assert report["timings"]["t3_tokens"] == 40
    assert "T3" in table and "S3Gen" in table
    assert "first_audio_s" not in report and "streamed" not in report


def test_streamed_synthesis_ends_with_the_whole_audio(client):
    audio, table, report, _ = client.predict(
        *synth_args("Streamed from the test.", "calm-mid", max_new_tokens=60, stream=True),
        api_name="/synthesize")
    samples, rate = sf.read(audio)
    assert rate == 24000 and len(samples) / rate == pytest.approx(report["audio_seconds"],
                                                                  abs=1e-3)
    assert report["streamed"] and 0 < report["first_audio_s"] < report["timings"]["total_s"]
    assert "first audio" in table


def test_add_voice_then_use_it(client):
    status, table = client.predict(handle_file(str(VOICE_CLIP)), "http voice", 0.7,
                                   api_name="/add_voice")
    assert "http voice" in status
    assert ["http voice", "user", 0.7] == table["data"][-1][:3]
    names = [row[0] for row in client.predict(api_name="/list_voices")]
    assert "http voice" in names
    _, _, report, _ = client.predict(*synth_args("Now in the new voice.", "http voice"),
                                  api_name="/synthesize")
    assert report["voice"] == {"name": "http voice", "source": "memory"}


def test_rename_then_remove_a_voice(client):
    client.predict(handle_file(str(VOICE_CLIP)), "to rename", 0.5, api_name="/add_voice")
    status, table = client.predict("to rename", "renamed", api_name="/rename_voice")
    assert "renamed" in status
    names = [row[0] for row in table["data"]]
    assert "renamed" in names and "to rename" not in names
    status, table = client.predict("renamed", api_name="/remove_voice")
    assert "Removed" in status
    assert "renamed" not in [row[0] for row in client.predict(api_name="/list_voices")]


def test_compare_runs_both_sides_with_medians_chart_and_history(client):
    (audio_a, audio_b, table, summary, chart, mels, history,
     csv_path) = client.predict("Compare me.", "calm-mid", 2, 30, "baseline", "cached", 2,
                                api_name="/compare")
    assert sf.read(audio_a)[0].shape == sf.read(audio_b)[0].shape
    rows = {row[0]: row for row in table["data"]}
    assert rows["total (s)"][1] > 0 and rows["total (s)"][2] > 0
    assert "faster" in summary or "slower" in summary
    # Both sides sample the same tokens (cached conditionals change no numerics).
    assert "Fidelity of B against A" in summary and "identical" in summary
    assert chart["type"] == "matplotlib" and mels["type"] == "matplotlib"
    (row,) = history["data"]
    assert row[3:6] == ["baseline", "cached", 2]
    assert math.isinf(float(row[10])) and row[11] is True
    assert Path(csv_path).read_text().splitlines()[0].startswith("time,text,voice,A,B")


def test_compare_refuses_a_preset_this_device_cannot_run(client):
    with pytest.raises(AppError) as info:
        client.predict("Compare me.", "calm-mid", 0, 20, "baseline", "gpu-fast", 1,
                       api_name="/compare")
    assert "cannot run on cpu" in str(info.value) and "CUDA" in str(info.value)


def with_setting(index: int, value, text: str = "Hello.") -> tuple:
    args = list(synth_args(text, "calm-mid"))
    args[index] = value
    return tuple(args)


# (synthesize arguments, what the error says): text, voice, settings and presets.
BAD_SYNTHESIS = [
    pytest.param(synth_args("", "calm-mid"), "Enter some text", id="empty"),
    pytest.param(synth_args("   ", "calm-mid"), "Enter some text", id="whitespace"),
    pytest.param(synth_args("?!... --", "calm-mid"), "nothing to speak", id="punctuation"),
    pytest.param(synth_args("\x07\x1b\x00", "calm-mid"), "Enter some text", id="controls"),
    pytest.param(synth_args("a " * 10_001, "calm-mid"), "the limit is 20000", id="too-long"),
    pytest.param(synth_args("word " * 200_000, "calm-mid"), "the limit is 20000", id="1MB"),
    pytest.param(synth_args("Hello.", "nobody"), "Unknown voice 'nobody'", id="voice"),
    pytest.param(synth_args("Hello.", "../calm-mid"), "Unknown voice", id="voice-path"),
    pytest.param(with_setting(5, 99.0), "temperature must be between 0.05 and 5.0 (got 99.0)",
                 id="temperature"),
    pytest.param(with_setting(4, -1.0), "cfg_weight must be between 0.0 and 1.0", id="cfg"),
    pytest.param(with_setting(9, -5), "seed must be at least 0 (got -5)", id="seed"),
    pytest.param(with_setting(10, 5000), "max_new_tokens must be between 0 and 1000",
                 id="tokens"),
    pytest.param(with_setting(5, "hot"), "temperature must be a number (got 'hot')",
                 id="wrong-type"),
    pytest.param(with_setting(9, None), "seed is empty: enter a number.", id="missing"),
    # (NaN cannot travel in JSON: gradio_client refuses to send it. GenerationParams and
    # the CLI refuse it: test_config.py, test_cli.py.)
    pytest.param(with_setting(2, "warp-speed"), "warp-speed", id="unknown-preset"),
    pytest.param(with_setting(2, "gpu-fast"), "cannot run on cpu", id="gpu-preset"),
]


@pytest.mark.parametrize("args, message", BAD_SYNTHESIS)
def test_bad_input_comes_back_as_a_readable_error(client, args, message):
    before = client.predict(api_name="/list_voices")
    with pytest.raises(AppError) as info:
        client.predict(*args, api_name="/synthesize")
    assert message in str(info.value)
    assert "Traceback" not in str(info.value)
    assert client.predict(api_name="/list_voices") == before


@pytest.mark.parametrize("text", ["שלום, זה מבחן.", "مرحبا بالعالم", "Hello 👋 world 🎉"])
def test_right_to_left_and_emoji_text_is_spoken(client, text):
    _, _, report, _ = client.predict(*synth_args(text, "calm-mid", max_new_tokens=12),
                                  api_name="/synthesize")
    assert report["timings"]["t3_tokens"] == 12


@pytest.mark.parametrize("name, message", [
    ("", "Give the voice a name"),
    ("x" * 65, "limited to 64 characters"),
    ("../evil", "looks like a path"),
    ("/etc/passwd", "looks like a path"),
    # calm-mid ships with the app: no "remove that one first", which cannot be done.
    ("CALM-MID", "A voice named 'calm-mid' exists; it ships with the app; choose another"),
    ("ｃａｌｍ-ｍｉｄ", "A voice named 'calm-mid' exists"),  # full-width: equal after NFKC
])
def test_bad_voice_names_are_refused_and_change_nothing(client, name, message):
    before = client.predict(api_name="/list_voices")
    with pytest.raises(AppError) as info:
        client.predict(handle_file(str(VOICE_CLIP)), name, 0.5, api_name="/add_voice")
    assert message in str(info.value)
    assert client.predict(api_name="/list_voices") == before


def test_html_in_a_voice_name_comes_back_escaped(client):
    name = "<b onmouseover=alert(1)>x; rm -rf ~ $(id)"
    status, table = client.predict(handle_file(str(VOICE_CLIP)), name, 0.5,
                                   api_name="/add_voice")
    assert "<b" not in status and "&lt;b onmouseover" in status
    assert name in [row[0] for row in table["data"]]  # stored as typed, never run
    client.predict(name, api_name="/remove_voice")



def test_html_in_an_error_message_comes_back_escaped(client):
    # The page renders an error's message as HTML; the name must show as typed.
    with pytest.raises(AppError) as info:
        client.predict(handle_file(str(VOICE_CLIP)), "<i>a/b</i>", 0.5, api_name="/add_voice")
    assert "'&lt;i&gt;a/b&lt;/i&gt;' looks like a path" in str(info.value)


def test_bad_voice_upload_is_refused_and_changes_nothing(client, tmp_path):
    fake = tmp_path / "notes.wav"
    fake.write_text("this is not audio")
    before = client.predict(api_name="/list_voices")
    with pytest.raises(AppError) as info:
        client.predict(handle_file(str(fake)), "fake", 0.5, api_name="/add_voice")
    assert "not a readable audio file" in str(info.value)
    assert client.predict(api_name="/list_voices") == before


def test_an_upload_is_deleted_soon_after_the_voice_is_added(client, server):
    sent = time.monotonic()
    client.predict(handle_file(str(VOICE_CLIP)), "deleted upload", 0.5, api_name="/add_voice")
    clip = VOICE_CLIP.read_bytes()

    def uploads():
        files = [p for p in (server[2] / "gradio-tmp").rglob("*") if p.is_file()]
        return [p for p in files if p.read_bytes() == clip]

    # The TTL, then Gradio's sweep every second (a tenth of the TTL, at least 1 s), and slack.
    deadline = sent + UPLOAD_TTL_S + 1 + 2
    while uploads() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not uploads()
    names = [row[0] for row in client.predict(api_name="/list_voices")]
    assert "deleted upload" in names  # the library kept its own copy


def test_an_upload_over_the_size_limit_is_refused_by_the_server(client, server, tmp_path):
    import httpx

    from chatterbox_demo.audio import MAX_BYTES

    big = tmp_path / "huge.wav"
    with open(big, "wb") as handle:
        handle.truncate(MAX_BYTES + 2**20)
    before = client.predict(api_name="/list_voices")
    # gradio_client reads the limit from the server and refuses before sending...
    with pytest.raises(ValueError, match="exceeds the maximum file size of 104857600 bytes"):
        client.predict(handle_file(str(big)), "huge", 0.5, api_name="/add_voice")
    # ...and a client that ignores it is stopped by the server itself.
    with open(big, "rb") as handle:
        response = httpx.post(server[0] + "gradio_api/upload", files={"files": handle},
                              timeout=60)
    assert response.status_code == 413
    assert not [p for p in (server[2] / "gradio-tmp").rglob("huge.wav")]
    assert client.predict(api_name="/list_voices") == before
