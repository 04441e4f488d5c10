"""An OpenAI-compatible speech API on the app's own server: ``POST /v1/audio/speech``,
``GET /v1/models`` and ``GET /v1/audio/voices``.

Requests go through the same :class:`ModelManager` as the page (one generation on the model
at a time). Errors use OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``.
When ``CHATTERBOX_API_KEY`` is set, every request needs ``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import base64
import hmac
import io
import itertools
import json
import logging
import os
import threading

import numpy as np
import soundfile as sf
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from .audio import to_pcm16
from .config import (
    MAX_LONG_TEXT_CHARS,
    GenerationParams,
    OptimizationConfig,
    config_from_spec,
    device_preset,
    queue_max,
)
from .manager import ModelManager, TextError, check_text
from .optimizations import unavailable_reason
from .pipeline import GenerationError
from .voices import VoiceError

log = logging.getLogger(__name__)

# Names a client may send as `model`: ours, and OpenAI's, so that existing clients work.
MODELS = ("chatterbox", "tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# response_format -> (soundfile format, subtype, content type); pcm is raw 16-bit LE mono.
FORMATS = {
    "wav": ("WAV", "PCM_16", "audio/wav"),
    "flac": ("FLAC", "PCM_16", "audio/flac"),
    "mp3": ("MP3", "MPEG_LAYER_III", "audio/mpeg"),
    "opus": ("OGG", "OPUS", "audio/ogg"),
    "pcm": (None, None, "audio/pcm"),
}
SPEED_RANGE = (0.25, 4.0)
# A request's body is read only this far: 20,000 characters of input, even each one escaped
# as \uXXXX, fit in an eighth of it, and a bigger body would only fill memory.
MAX_BODY_BYTES = 1 << 20
# What a request can get wrong past parsing: bad text or settings, or a generation that made
# no speech (too small a token budget); a 400 saying what to change, not a 500.
REQUEST_ERRORS = (ValueError, GenerationError)
# Requests allowed at once: one on the model and QUEUE_MAX waiting; more get 503 at once.
QUEUE_MAX = queue_max()
_waiting = threading.BoundedSemaphore(QUEUE_MAX + 1)


class StreamBroken(RuntimeError):
    """A streamed reply failed after its 200 went out: the SSE stream sends it as an
    ``error`` event; a raw pcm body is cut off by it (an incomplete chunked transfer)."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _check_key(request: Request) -> None:
    key = os.environ.get("CHATTERBOX_API_KEY")
    if not key:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise ApiError(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'.",
                       code="invalid_api_key", kind="authentication_error")


def _field(body: dict, name: str, kind, default=None, required: bool = False):
    value = body.get(name, default)
    if value is None and required:
        raise ApiError(400, f"'{name}' is required.", param=name)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ApiError(400, f"'{name}' must be a {names} (got {value!r}).", param=name)
    return value


def parse_speech_request(body) -> dict:
    """The request body to checked arguments; ``ApiError`` says what is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    model = _field(body, "model", str, required=True)
    if model not in MODELS:
        raise ApiError(404, f"Unknown model {model!r}; available: {', '.join(MODELS)}.",
                       param="model", code="model_not_found")
    text = _field(body, "input", str, required=True)
    if len(text) > MAX_LONG_TEXT_CHARS:
        raise ApiError(413, f"'input' is {len(text)} characters; the limit is "
                            f"{MAX_LONG_TEXT_CHARS}.", param="input")
    voice = _field(body, "voice", str, required=True)
    response_format = _field(body, "response_format", str, "mp3")
    if response_format not in FORMATS:
        raise ApiError(400, f"response_format {response_format!r} is not supported; use one "
                            f"of {', '.join(FORMATS)}.", param="response_format")
    stream_format = _field(body, "stream_format", str, "audio")
    if stream_format not in ("audio", "sse"):
        raise ApiError(400, "stream_format must be 'audio' or 'sse'.", param="stream_format")
    speed = _field(body, "speed", (int, float), 1.0)
    if not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:  # before float(): 10**400 overflows
        raise ApiError(400, f"speed must be between {SPEED_RANGE[0]} and {SPEED_RANGE[1]}.",
                       param="speed")
    speed = float(speed)
    # None: the preset the server started on, whatever the page has switched to since.
    preset = _field(body, "preset", str)
    try:
        config = None if preset is None else config_from_spec(preset)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="preset") from None
    settings = {}
    for name in ("exaggeration", "cfg_weight", "temperature", "seed", "max_new_tokens"):
        value = _field(body, name, (int, float))
        if value is not None:
            settings[name] = value
    try:
        params = GenerationParams(**settings)
        text = check_text(text, MAX_LONG_TEXT_CHARS)
    except ValueError as exc:
        param = "input" if isinstance(exc, TextError) else str(exc).split(" ")[0]
        raise ApiError(400, str(exc), param=param) from None
    return {"text": text, "voice": voice, "format": response_format,
            "stream_format": stream_format, "speed": speed, "params": params,
            "config": config}


def encode(wav: np.ndarray, sample_rate: int, response_format: str) -> bytes:
    fmt, subtype, _ = FORMATS[response_format]
    if fmt is None:  # raw PCM
        return to_pcm16(wav).astype("<i2").tobytes()
    buffer = io.BytesIO()
    sf.write(buffer, wav, sample_rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def change_speed(wav: np.ndarray, speed: float) -> np.ndarray:
    """Faster or slower speech at the same pitch (phase-vocoder time stretch)."""
    if speed == 1.0:
        return wav
    import librosa

    return librosa.effects.time_stretch(wav, rate=speed).astype(np.float32)


def _admit(manager: ModelManager, args: dict) -> OptimizationConfig:
    """Take a place in the queue (503 when it is full), check the voice (404) and return
    the configuration to run (400 when it cannot run here); the caller releases
    ``_waiting`` when done."""
    if not _waiting.acquire(blocking=False):
        raise ApiError(503, "The server is busy: too many requests are waiting. Retry later.",
                       code="queue_full", kind="server_error")
    try:
        _load(manager)
        try:
            manager.library.get(args["voice"])
        except VoiceError as exc:
            raise ApiError(404, str(exc), param="voice", code="voice_not_found") from None
        # Not manager.config: that is whatever a page user last switched to, and the same
        # request must give the same audio.
        config = args["config"] or manager.start_config
        reason = unavailable_reason(config, manager.device)
        if reason:
            raise ApiError(400, f"This preset cannot run on {manager.device}: {reason}. "
                           f"{device_preset(manager.device)} runs here.", param="preset")
        return config
    except BaseException:
        _waiting.release()
        raise


def _load(manager: ModelManager) -> None:
    try:
        manager.load()
    except Exception as exc:  # the server's fault, not the request's: not a 4xx
        log.exception("Loading the model failed")
        raise ApiError(500, f"The model could not be loaded ({exc}); see the server's log.",
                       kind="server_error") from None


def synthesize(manager: ModelManager, args: dict) -> tuple[np.ndarray, int]:
    config = _admit(manager, args)
    try:
        result = manager.generate_long(args["text"], args["voice"], args["params"], config)
    except REQUEST_ERRORS as exc:
        raise ApiError(400, str(exc)) from None
    finally:
        _waiting.release()
    return change_speed(result.wav, args["speed"]), result.sample_rate


def open_stream(manager: ModelManager, args: dict):
    """Start a streamed generation and wait for its first audio, so that what fails
    early (no speech produced) is still an error response; then (the rest as 16-bit PCM
    byte blocks, ``finish``). ``finish`` stops the generation and gives the queue place
    back, once however often it is called: the blocks call it when they end, and the
    response must call it when it is done, since Starlette never starts the blocks (so
    never runs their ``finally``) for a client that hung up before the first audio."""
    config = _admit(manager, args)
    chunks = manager.stream(args["text"], args["voice"], args["params"], config)
    try:
        first = next(chunks)
    except REQUEST_ERRORS as exc:
        _waiting.release()
        raise ApiError(400, str(exc)) from None
    except BaseException:
        _waiting.release()
        raise
    finished = threading.Lock()

    def finish():
        if finished.acquire(blocking=False):
            try:
                chunks.close()  # a client that hung up stops the generation
            finally:
                _waiting.release()

    def pcm_blocks():
        try:
            for chunk in itertools.chain([first], chunks):
                if len(chunk.wav):
                    yield encode(chunk.wav, chunk.sample_rate, "pcm")
        except REQUEST_ERRORS as exc:  # a later chunk: the 200 is already sent
            log.warning("A streamed reply ended early: %s", exc)
            raise StreamBroken(str(exc)) from None
        finally:
            finish()

    return pcm_blocks(), finish


def build_router(manager_factory=ModelManager.instance) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    def list_models(request: Request):
        try:
            _check_key(request)
        except ApiError as exc:
            return exc.response()
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0,
                                            "owned_by": "resemble-ai"} for m in MODELS]}

    @router.get("/audio/voices")
    def list_voices(request: Request):
        try:
            _check_key(request)
            manager = manager_factory()
            _load(manager)
        except ApiError as exc:
            return exc.response()
        return {"voices": [{"name": v.name, "kind": v.kind, "exaggeration": v.exaggeration,
                            "seconds": v.seconds} for v in manager.list_voices()]}

    @router.post("/audio/speech")
    async def speech(request: Request):
        try:
            _check_key(request)
            try:
                body = json.loads(await _read_body(request))
            except (ValueError, RecursionError):  # RecursionError: nesting too deep
                raise ApiError(400, "The request body is not valid JSON.") from None
            args = parse_speech_request(body)
        except ApiError as exc:
            return exc.response()
        return await _speak(manager_factory(), args)

    return router


async def _read_body(request: Request) -> bytes:
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"The request body is over {MAX_BODY_BYTES // 1024} KB; "
                                f"'input' is limited to {MAX_LONG_TEXT_CHARS} characters.")
    return bytes(body)


async def _speak(manager: ModelManager, args: dict):
    """Raw PCM at normal speed streams as it is made; other formats need the whole audio
    (a container header, or the time stretch for ``speed``) and are sent when done."""
    from starlette.concurrency import run_in_threadpool

    finish = None  # what the response runs when done: ends a streamed generation
    try:
        if args["format"] == "pcm" and args["speed"] == 1.0:
            blocks, finish = await run_in_threadpool(open_stream, manager, args)
        else:
            wav, sample_rate = await run_in_threadpool(synthesize, manager, args)
            # Encoding minutes of audio (mp3, opus) takes seconds: off the event loop, which
            # serves the page and every other request meanwhile.
            audio = await run_in_threadpool(encode, wav, sample_rate, args["format"])
            if args["stream_format"] == "audio":
                return Response(audio, media_type=FORMATS[args["format"]][2])
            blocks = [audio[start:start + SSE_BLOCK] for start in range(0, len(audio),
                                                                        SSE_BLOCK)]
    except ApiError as exc:
        return exc.response()
    # Starlette runs a background task after the response, whether the client stayed or
    # hung up; it first waits for any block being made (a thread is never abandoned), so
    # ``finish`` never closes a generator that is running.
    background = BackgroundTask(finish) if finish else None
    if args["stream_format"] == "sse":
        return StreamingResponse(_sse_events(blocks), media_type="text/event-stream",
                                 background=background)
    return StreamingResponse(blocks, media_type=FORMATS["pcm"][2], background=background)


SSE_BLOCK = 32 * 1024  # bytes of a whole encoded file per SSE event


def _sse_events(blocks):
    """OpenAI's speech SSE: ``speech.audio.delta`` events with base64 audio, then
    ``speech.audio.done``; or, when a streamed generation fails part-way, an ``error``
    event (OpenAI's error body) in its place."""
    try:
        for block in blocks:
            delta = base64.b64encode(block).decode()
            yield f"data: {json.dumps({'type': 'speech.audio.delta', 'audio': delta})}\n\n"
    except StreamBroken as exc:
        yield f"data: {json.dumps({'type': 'error', **ApiError(400, str(exc)).body()})}\n\n"
        return
    yield f"data: {json.dumps({'type': 'speech.audio.done'})}\n\n"
