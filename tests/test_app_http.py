"""app.py started as a real server on a free port and driven over HTTP with gradio_client."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import soundfile as sf
from app_server import ROOT, running_app
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

VOICE_CLIP = ROOT / "voices" / "calm-mid.wav"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("http")) as url_and_port:
        yield url_and_port


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


def synth_args(text: str, voice: str, seed: int = 1, max_new_tokens: int = 40):
    # text, voice, preset, exaggeration, cfg_weight, temperature, top_p, min_p,
    # repetition_penalty, seed, max_new_tokens
    return (text, voice, "cached", 0.5, 0.5, 0.8, 1.0, 0.05, 1.2, seed, max_new_tokens)


def test_names_its_endpoints_and_parameters(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in ("/synthesize", "/add_voice", "/remove_voice", "/rename_voice",
                 "/list_voices", "/compare"):
        assert name in endpoints
    params = [p["parameter_name"] for p in endpoints["/synthesize"]["parameters"]]
    assert params[:2] == ["text", "voice"] and "seed" in params and "max_new_tokens" in params


def test_synthesize_returns_audio_and_report(client):
    audio, table, report = client.predict(*synth_args("Hello from the test.", "calm-mid"),
                                          api_name="/synthesize")
    samples, rate = sf.read(audio)
    assert rate == 24000 and len(samples) > 0
    assert report["voice"]["name"] == "calm-mid"
    assert report["timings"]["t3_tokens"] == 40
    assert "T3" in table and "S3Gen" in table


def test_add_voice_then_use_it(client):
    status, table = client.predict(handle_file(str(VOICE_CLIP)), "http voice", 0.7,
                                   api_name="/add_voice")
    assert "http voice" in status
    assert ["http voice", "user", 0.7] == table["data"][-1][:3]
    names = [row[0] for row in client.predict(api_name="/list_voices")]
    assert "http voice" in names
    _, _, report = client.predict(*synth_args("Now in the new voice.", "http voice"),
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


@pytest.mark.parametrize("args, message", [
    (synth_args("   ", "calm-mid"), "Enter some text"),
    (synth_args("Hello.", "nobody"), "Unknown voice 'nobody'"),
])
def test_bad_input_comes_back_as_a_readable_error(client, args, message):
    with pytest.raises(AppError) as info:
        client.predict(*args, api_name="/synthesize")
    assert message in str(info.value)
    assert "Traceback" not in str(info.value)


def test_bad_voice_upload_is_refused_and_changes_nothing(client, tmp_path):
    fake = tmp_path / "notes.wav"
    fake.write_text("this is not audio")
    before = client.predict(api_name="/list_voices")
    with pytest.raises(AppError) as info:
        client.predict(handle_file(str(fake)), "fake", 0.5, api_name="/add_voice")
    assert "not a readable audio file" in str(info.value)
    assert client.predict(api_name="/list_voices") == before
