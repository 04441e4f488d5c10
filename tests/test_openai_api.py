"""The OpenAI-compatible speech API: the official `openai` SDK against app.py on a free
port (with an API key), and the router in-process for the error cases."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time
import urllib.request

import numpy as np
import openai
import pytest
import soundfile as sf
import uvicorn
from app_server import free_port, running_app
from fastapi import FastAPI
from fastapi.testclient import TestClient

from chatterbox_demo import api
from chatterbox_demo.config import get_preset

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
    # Whole numbers too big for a float: math.isnan and float() overflowed into a 500.
    ({"seed": 10**400}, 400, "seed must be between"),
    ({"speed": 10**400}, 400, "speed must be between 0.25 and 4.0"),
    ({"preset": "fastest"}, 400, "Unknown preset 'fastest'"),
    ({"preset": "cached+cfm_steps=0"}, 400, "cfm_steps must be between 1 and 50"),
    ({"preset": "gpu-fast"}, 400, "This preset cannot run on cpu"),
    ({"preset": "gpu-compiled"}, 400, "cpu-fast runs here."),
])
def test_bad_requests_get_openai_errors(http, fields, status, words):
    response = speak(http, **fields)
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_a_request_runs_the_start_preset_whatever_the_page_switched_to(http, tiny_manager):
    """The page's preset switch is the manager's, for everyone: the API followed it, so
    the same request gave other audio after a page user picked cpu-turbo. It runs the
    preset the server started on, or the one it names."""
    first = speak(http, response_format="wav", seed=4)
    try:
        tiny_manager.apply_preset("cpu-turbo")
        assert speak(http, response_format="wav", seed=4).content == first.content
    finally:
        tiny_manager.apply_preset("cached")
    assert tiny_manager.start_config == get_preset("cpu-fast")  # this CPU's start preset
    named = speak(http, response_format="wav", seed=4, preset="cpu-turbo")
    assert named.status_code == 200 and named.content != first.content
    assert speak(http, response_format="wav", seed=4, preset="cpu-fast").content == first.content
    assert tiny_manager.preset == "cached"  # a request's preset is not the page's


def test_missing_fields_and_bad_json(http):
    response = http.post("/v1/audio/speech", json={"model": "chatterbox", "voice": "calm-mid"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"
    response = http.post("/v1/audio/speech", content=b"{not json",
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    # Nesting deeper than Python's recursion limit is malformed JSON too, not a 500.
    response = http.post("/v1/audio/speech", content=b"[" * 100_000 + b"]" * 100_000,
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_a_body_past_the_limit_is_refused_before_it_is_read_whole(http):
    body = json.dumps({"model": "chatterbox", "voice": "calm-mid",
                       "input": "a" * (api.MAX_BODY_BYTES + 1)}).encode()
    response = http.post("/v1/audio/speech", content=body,
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "request body is over 1024 KB" in response.json()["error"]["message"]


def test_a_model_that_fails_to_load_is_a_server_error_not_an_unknown_voice(http,
                                                                          tiny_manager,
                                                                          monkeypatch):
    def broken():
        raise ValueError("weights spec 'nowhere' is not understood")

    monkeypatch.setattr(tiny_manager, "load", broken)
    response = speak(http)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "could not be loaded" in error["message"]
    assert api._waiting._value == api.QUEUE_MAX + 1


def test_audio_is_encoded_off_the_event_loop(http, monkeypatch):
    import asyncio

    real, on_loop = api.encode, []

    def encode(*args):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop in this thread: a worker thread
            on_loop.append(False)
        return real(*args)

    monkeypatch.setattr(api, "encode", encode)
    assert speak(http, response_format="mp3").status_code == 200
    assert on_loop == [False]


@pytest.mark.parametrize("fmt", ["wav", "pcm"])  # pcm: the streamed path
def test_no_speech_made_is_a_400_that_says_what_to_try(http, fmt):
    response = speak(http, response_format=fmt, max_new_tokens=1)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith("The model stopped before producing any speech")
    assert error["type"] == "invalid_request_error"
    assert api._waiting._value == api.QUEUE_MAX + 1


def test_a_full_queue_is_503(http, monkeypatch):
    import threading

    monkeypatch.setattr(api, "_waiting", threading.BoundedSemaphore(1))
    api._waiting.acquire()
    response = speak(http)
    assert response.status_code == 503 and response.json()["error"]["code"] == "queue_full"


@contextlib.contextmanager
def serving(app):
    """``app`` on a real server on a free loopback port (only a real server sees a client
    hang up); yields its port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_client_gone_before_the_first_audio_gives_its_place_back(tiny_manager,
                                                                   monkeypatch):
    """For a client that hung up before the first audio, Starlette never starts a
    streamed body, so its ``finally`` never gives the queue place back: with one place,
    every later request was a 503."""
    monkeypatch.setattr(api, "_waiting", threading.BoundedSemaphore(1))
    admitted, hung_up, stream = threading.Event(), threading.Event(), tiny_manager.stream

    def first_audio_after_the_hang_up(*args, **kwargs):
        admitted.set()  # the request holds the place now
        hung_up.wait(60)
        yield from stream(*args, **kwargs)

    monkeypatch.setattr(tiny_manager, "stream", first_audio_after_the_hang_up)
    app = FastAPI()
    app.include_router(api.build_router(lambda: tiny_manager))
    body = json.dumps({"model": "chatterbox", "voice": "calm-mid", "response_format": "pcm",
                       "input": "Hello there.", "max_new_tokens": 40}).encode()
    with serving(app) as port:
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert admitted.wait(60)
        hung_up.set()
        assert api._waiting.acquire(timeout=60), "the place was never given back"
        api._waiting.release()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/audio/speech", headers={"Content-Type":
                                                                 "application/json"},
            data=json.dumps({**json.loads(body), "response_format": "wav"}).encode())
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200 and response.read()[:4] == b"RIFF"


def _second_chunk_fails(tiny_manager, monkeypatch):
    """The streamed generation speaks its first chunk, then a later one makes no speech."""
    from chatterbox_demo.pipeline import GenerationError

    stream = tiny_manager.stream

    def first_chunk_then_failure(*args, **kwargs):
        chunks = stream(*args, **kwargs)
        yield next(chunks)
        chunks.close()
        raise GenerationError("The model stopped before producing any speech for chunk 2.")

    monkeypatch.setattr(tiny_manager, "stream", first_chunk_then_failure)


def test_a_failure_after_the_first_audio_is_an_sse_error_event(http, tiny_manager,
                                                               monkeypatch):
    """The status was already sent as 200: the stream ended with no word of why, and the
    server logged an ASGI traceback."""
    _second_chunk_fails(tiny_manager, monkeypatch)
    response = speak(http, response_format="pcm", stream_format="sse")
    events = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ")]
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["message"].startswith("The model stopped before producing")
    assert api._waiting._value == api.QUEUE_MAX + 1


def test_a_failure_after_the_first_audio_cuts_a_raw_pcm_stream_short(http, tiny_manager,
                                                                     monkeypatch):
    """Raw pcm has no place for a message once its 200 is sent: the body is cut off (an
    incomplete chunked transfer), so a client cannot take half a reply for a whole one."""
    _second_chunk_fails(tiny_manager, monkeypatch)
    with pytest.raises(api.StreamBroken, match="stopped before producing"):
        speak(http, response_format="pcm")
    assert api._waiting._value == api.QUEUE_MAX + 1


def test_voices_of_a_model_that_fails_to_load_is_a_json_server_error(http, tiny_manager,
                                                                     monkeypatch):
    def broken():
        raise ValueError("weights spec 'nowhere' is not understood")

    monkeypatch.setattr(tiny_manager, "load", broken)
    response = http.get("/v1/audio/voices")
    assert response.status_code == 500
    assert "could not be loaded" in response.json()["error"]["message"]


def test_voices_and_an_unknown_voice_answer_while_a_generation_runs(http, tiny_manager):
    """Both waited on the model's lock, which a generation holds throughout: a 404 came
    after 10 s, and forty such requests used up the server's threads."""
    holding, done = threading.Event(), threading.Event()

    def generation():
        with tiny_manager.lock:
            holding.set()
            done.wait(60)

    generating = threading.Thread(target=generation)
    generating.start()
    answers = {}
    try:
        assert holding.wait(10)

        def ask():
            answers["voices"] = http.get("/v1/audio/voices").status_code
            answers["unknown"] = speak(http, voice="nobody").status_code

        asking = threading.Thread(target=ask)
        asking.start()
        asking.join(30)
    finally:
        done.set()
        generating.join()
        asking.join()
    assert answers == {"voices": 200, "unknown": 404}
