import hashlib
import math

import numpy as np
import pytest
import soundfile as sf
from conftest import speech_like, write_audio

from chatterbox_demo import audio
from chatterbox_demo.audio import AudioError, load_reference, write_wav


def _refused(path, *words):
    """load_reference must raise AudioError whose message contains every word."""
    with pytest.raises(AudioError) as info:
        load_reference(path)
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), f"{word!r} not in {message!r}"
    assert "Traceback" not in message and "\n" not in message
    return message


# --- accepted -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,fmt,subtype",
    [
        ("a.wav", "WAV", "PCM_16"),
        ("a.flac", "FLAC", "PCM_16"),
        ("a.ogg", "OGG", "VORBIS"),
        ("a.mp3", "MP3", "MPEG_LAYER_III"),
        ("u8.wav", "WAV", "PCM_U8"),
        ("f32.wav", "WAV", "FLOAT"),
        ("f64.wav", "WAV", "DOUBLE"),
        ("i24.wav", "WAV", "PCM_24"),
    ],
)
def test_accepts_formats_and_sample_types(tmp_path, name, fmt, subtype):
    path = write_audio(tmp_path / name, seconds=2.0, sample_rate=16000, subtype=subtype,
                       format=fmt)
    clip = load_reference(path)
    assert clip.path == path
    assert clip.sample_rate == 16000
    assert clip.channels == 1
    assert clip.seconds == pytest.approx(2.0, abs=0.1)  # lossy codecs pad a little
    assert clip.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("sample_rate", [8000, 22050, 44100, 96000])
def test_accepts_sample_rates(make_wav, sample_rate):
    clip = load_reference(make_wav(f"sr{sample_rate}.wav", seconds=1.5, sample_rate=sample_rate))
    assert clip.sample_rate == sample_rate
    assert clip.seconds == pytest.approx(1.5)


@pytest.mark.parametrize("channels", [1, 3, 6, 8])
def test_accepts_one_to_eight_channels(make_wav, channels):
    clip = load_reference(make_wav(f"ch{channels}.wav", channels=channels, sample_rate=16000))
    assert clip.channels == channels


def test_accepts_stereo(make_wav):
    clip = load_reference(make_wav("stereo.wav", channels=2, sample_rate=44100))
    assert clip.channels == 2
    assert clip.seconds == pytest.approx(2.0)


def test_accepts_the_shipped_voices(ref_wav):
    clip = load_reference(str(ref_wav))  # a str path works too
    assert clip.sample_rate == 24000 and clip.channels == 1
    assert 1.0 <= clip.seconds <= 10.0


def test_length_limits_are_inclusive(make_wav):
    assert load_reference(make_wav("one.wav", seconds=audio.MIN_SECONDS)).seconds == 1.0
    five_minutes = make_wav("five.wav", seconds=audio.MAX_SECONDS, sample_rate=8000,
                            kind="sine")
    assert load_reference(five_minutes).seconds == audio.MAX_SECONDS


def test_quiet_but_not_silent_is_accepted(tmp_path):
    data = speech_like(2.0, 16000) * (2 * audio.SILENCE_PEAK / 0.5)  # peak 2e-3
    clip = load_reference(write_audio(tmp_path / "quiet.wav", data=data, subtype="FLOAT",
                                      sample_rate=16000))
    assert clip.seconds == pytest.approx(2.0)


def test_sha256_is_of_the_content(make_wav):
    a = load_reference(make_wav("a.wav", seed=1))
    b = load_reference(make_wav("b.wav", seed=1))
    c = load_reference(make_wav("c.wav", seed=2))
    assert a.sha256 == b.sha256  # same bytes, different names: same cache key
    assert a.sha256 != c.sha256


# --- refused --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [None, "", "   "])
def test_refuses_no_path(path):
    _refused(path, "no audio file given", "upload")


def test_refuses_missing_file(tmp_path):
    _refused(tmp_path / "nowhere.wav", "nowhere.wav", "does not exist")


def test_refuses_a_directory(tmp_path):
    _refused(tmp_path, tmp_path.name, "not a file")


def test_refuses_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    _refused(path, "empty.wav", "is empty", "WAV")


def test_refuses_text_renamed_wav(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("These are my meeting notes, not a recording.\n" * 20)
    message = _refused(path, "notes.wav", "not a readable audio file", "WAV, FLAC, MP3 or OGG")
    assert "0x" not in message and "BytesIO" not in message  # no internals in the message


def test_refuses_png_renamed_wav(tmp_path):
    path = tmp_path / "picture.wav"
    rng = np.random.default_rng(0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + rng.bytes(2048))
    _refused(path, "picture.wav", "not a readable audio file")


def test_refuses_truncated_wav_header_only(make_wav, tmp_path):
    full = make_wav("full.wav").read_bytes()
    header_only = tmp_path / "header.wav"
    header_only.write_bytes(full[:44])  # the RIFF/fmt/data header, no sample bytes
    _refused(header_only, "header.wav", "no audio samples")
    cut_header = tmp_path / "cut.wav"
    cut_header.write_bytes(full[:30])  # cut inside the header
    _refused(cut_header, "cut.wav", "not a readable audio file")


def test_refuses_zero_samples(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros((0, 1), dtype=np.float32), 16000)
    _refused(path, "zero.wav", "no audio samples")


@pytest.mark.parametrize("subtype", ["PCM_16", "FLOAT"])
def test_refuses_silence(make_wav, subtype):
    _refused(make_wav("quiet.wav", kind="silence", subtype=subtype), "quiet.wav", "silent")


def test_refuses_below_silence_threshold(tmp_path):
    data = speech_like(2.0, 16000) * (0.5 * audio.SILENCE_PEAK / 0.5)  # peak 5e-4
    path = write_audio(tmp_path / "hush.wav", data=data, subtype="FLOAT", sample_rate=16000)
    _refused(path, "silent")


@pytest.mark.parametrize("scale", [1e4, 1e30])  # peaks 5000 and 5e29
def test_refuses_float_samples_far_outside_full_scale(tmp_path, scale):
    # 1e30 is finite in float32, and crashed librosa's mel computation with a ValueError.
    data = speech_like(2.0, 16000) * scale
    path = write_audio(tmp_path / "loud.wav", data=data, subtype="FLOAT", sample_rate=16000)
    _refused(path, "loud.wav", "damaged or wrongly scaled")


def test_accepts_float_headroom_over_full_scale(tmp_path):
    data = speech_like(2.0, 16000) * 4.0  # peak 2.0: +6 dBFS, ordinary in float audio
    path = write_audio(tmp_path / "hot.wav", data=data, subtype="FLOAT", sample_rate=16000)
    assert load_reference(path).seconds == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_refuses_nan_and_inf_samples(tmp_path, bad):
    data = speech_like(2.0, 16000)
    data[1234, 0] = bad
    path = write_audio(tmp_path / "nan.wav", data=data, subtype="FLOAT", sample_rate=16000)
    _refused(path, "nan.wav", "invalid", "NaN or infinite")


def test_refuses_under_one_second(make_wav):
    message = _refused(make_wav("short.wav", seconds=0.5), "short.wav", "0.50 s",
                       "at least 1 s")
    assert "5-10 s" in message  # tells the user what works


@pytest.mark.parametrize("sample_rate", [100, 7999])
def test_refuses_sample_rates_below_telephone_quality(make_wav, sample_rate):
    path = make_wav(f"sr{sample_rate}.wav", seconds=2.0, sample_rate=sample_rate, kind="sine")
    _refused(path, f"sr{sample_rate}.wav", f"{sample_rate} Hz", "at least 8000 Hz")


def test_refuses_over_five_minutes(make_wav):
    path = make_wav("long.wav", seconds=301, sample_rate=8000, kind="sine")
    _refused(path, "long.wav", "5.0 minutes long", "limit is 5 minutes")


def test_refuses_too_many_bytes(make_wav, monkeypatch):
    path = make_wav("big.wav")
    monkeypatch.setattr(audio, "MAX_BYTES", path.stat().st_size - 1)
    _refused(path, "big.wav", "the limit is")


def test_audio_error_is_a_value_error():
    # The UI and CLI catch ValueError for user mistakes.
    assert issubclass(AudioError, ValueError)


# --- writing --------------------------------------------------------------------------------


def test_write_wav_round_trips(tmp_path):
    samples = speech_like(1.25, 24000)[:, 0]
    path = write_wav(tmp_path / "deep" / "dir" / "out.wav", samples, 24000)
    assert path == tmp_path / "deep" / "dir" / "out.wav"
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype, info.format) == (
        24000, 1, "PCM_16", "WAV")
    back, sr = sf.read(path, dtype="float32")
    assert sr == 24000 and back.shape == samples.shape
    np.testing.assert_allclose(back, samples, atol=1.0 / 2**15)
    # And the result is a usable reference clip.
    assert load_reference(path).seconds == pytest.approx(1.25)
    # Atomic: no temporary file is left behind.
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.wav"]


def test_write_wav_replaces_and_accepts_other_dtypes(tmp_path):
    path = tmp_path / "out.wav"
    write_wav(path, np.full(24000, 0.25, dtype=np.float32), 24000)
    write_wav(path, np.linspace(-0.5, 0.5, 16000, dtype=np.float64), 16000)
    back, sr = sf.read(path)
    assert sr == 16000 and len(back) == 16000
    assert back[0] == pytest.approx(-0.5, abs=1e-4) and back[-1] == pytest.approx(0.5, abs=1e-4)
