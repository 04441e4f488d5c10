"""The OpenAI-compatible speech API: the official `openai` SDK against app.py on a free
port (with an API key), and the router in-process for the error cases."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import openai
import pytest
import soundfile as sf
from app_server import running_app
from fastapi import FastAPI
from fastapi.testclient import TestClient

from chatterbox_demo import api

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("openai"), CHATTERBOX_API_KEY=KEY) as started:
        yield started[0]


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=server + "v1", api_key=KEY, max_retries=0, timeout=120)


def test_sdk_speech_returns_the_asked_format(sdk):
    response = sdk.audio.speech.create(model="chatterbox", voice="calm-mid", input="Hello there.",
                                       response_format="wav", extra_body={"seed": 3,
                                                                          "max_new_tokens": 20})
    samples, rate = sf.read(io.BytesIO(response.content))
    assert rate == 24000 and len(samples) > 0


def test_sdk_streaming_response(sdk, tmp_path):
    out = tmp_path / "speech.flac"
    with sdk.audio.speech.with_streaming_response.create(
            model="tts-1", voice="bright-high", input="Streaming test.", response_format="flac",
            extra_body={"max_new_tokens": 20}) as response:
        response.stream_to_file(out)
    samples, rate = sf.read(out)
    assert rate == 24000 and len(samples) > 0


def test_sdk_lists_models_and_errors_have_openai_shape(sdk):
    assert "chatterbox" in [m.id for m in sdk.models.list().data]
    with pytest.raises(openai.NotFoundError) as info:
        sdk.audio.speech.create(model="chatterbox", voice="nobody", input="Hi.")
    assert "Unknown voice 'nobody'" in info.value.body["message"]


def test_the_key_is_required_when_set(server):
    bare = openai.OpenAI(base_url=server + "v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bare.models.list()


# --- the router in-process: open (no key), and every error case ---------------------------


@pytest.fixture(scope="module")
def http(tiny_manager):
    app = FastAPI()
    app.include_router(api.build_router(lambda: tiny_manager))
    return TestClient(app)


def speak(http, **fields):
    body = {"model": "chatterbox", "input": "Hello.", "voice": "calm-mid",
            "max_new_tokens": 12, **fields}
    return http.post("/v1/audio/speech", json=body)


def test_open_without_a_key_and_voices_listed(http, monkeypatch):
    monkeypatch.delenv("CHATTERBOX_API_KEY", raising=False)
    voices = http.get("/v1/audio/voices").json()["voices"]
    assert {"bright-high", "calm-mid", "narrator-low"} <= {v["name"] for v in voices}


@pytest.mark.parametrize("fmt, check", [
    ("wav", lambda b: b[:4] == b"RIFF"),
    ("flac", lambda b: b[:4] == b"fLaC"),
    ("mp3", lambda b: len(b) > 100),
    ("opus", lambda b: b[:4] == b"OggS"),
    ("pcm", lambda b: len(b) % 2 == 0 and len(b) > 100),
])
def test_every_supported_format(http, fmt, check):
    response = speak(http, response_format=fmt)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(api.FORMATS[fmt][2])
    assert check(response.content)


def test_speed_changes_the_duration(http):
    normal = sf.read(io.BytesIO(speak(http, response_format="wav", seed=1).content))[0]
    fast = sf.read(io.BytesIO(speak(http, response_format="wav", seed=1, speed=2.0).content))[0]
    assert len(fast) == pytest.approx(len(normal) / 2, rel=0.05)


def test_sse_stream_has_deltas_then_done(http):
    response = speak(http, response_format="wav", stream_format="sse")
    events = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert audio[:4] == b"RIFF" and np.frombuffer(audio[44:], "<i2").size > 0


def test_pcm_streams_as_it_is_made(http, tiny_manager):
    # pcm at normal speed is the streamed path: several SSE deltas (one per piece) that
    # add up to the whole generation, which a one-shot generation's length confirms.
    fields = dict(response_format="pcm", seed=2, max_new_tokens=120, input="A streamed reply.")
    events = [json.loads(line[6:]) for line in
              speak(http, stream_format="sse", **fields).text.splitlines()
              if line.startswith("data: ")]
    deltas = [base64.b64decode(e["audio"]) for e in events[:-1]]
    assert len(deltas) >= 4 and events[-1]["type"] == "speech.audio.done"
    raw = speak(http, **fields)
    assert raw.status_code == 200 and "content-length" not in raw.headers  # chunked
    assert raw.content == b"".join(deltas)
    assert api._waiting._value == api.QUEUE_MAX + 1  # every place in the queue given back


@pytest.mark.parametrize("fields, status, words", [
    ({"input": ""}, 400, "Enter some text"),
    ({"input": "?!"}, 400, "nothing to speak"),
    ({"input": "a" * 20_001}, 413, "the limit is 20000"),
    ({"input": 42}, 400, "'input' must be a str"),
    ({"voice": "nobody"}, 404, "Unknown voice 'nobody'"),
    ({"model": "gpt-9"}, 404, "Unknown model 'gpt-9'"),
    ({"response_format": "aac"}, 400, "response_format 'aac' is not supported"),
    ({"stream_format": "ws"}, 400, "stream_format must be"),
    ({"speed": 9}, 400, "speed must be between 0.25 and 4.0"),
    ({"temperature": 99}, 400, "temperature must be between"),
    ({"seed": "x"}, 400, "'seed' must be a int or float"),
])
def test_bad_requests_get_openai_errors(http, fields, status, words):
    response = speak(http, **fields)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_missing_fields_and_bad_json(http):
    response = http.post("/v1/audio/speech", json={"model": "chatterbox", "voice": "calm-mid"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"
    response = http.post("/v1/audio/speech", content=b"{not json",
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_a_full_queue_is_503(http, monkeypatch):
    import threading

    monkeypatch.setattr(api, "_waiting", threading.BoundedSemaphore(1))
    api._waiting.acquire()
    response = speak(http)
    assert response.status_code == 503 and response.json()["error"]["code"] == "queue_full"
