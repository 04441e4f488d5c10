import dataclasses
import shutil
from collections import OrderedDict

import numpy as np
import pytest
import torch
from conftest import SHIPPED, VOICES_DIR

from chatterbox_demo import manager as manager_mod
from chatterbox_demo import pipeline
from chatterbox_demo.config import (
    MAX_TEXT_CHARS,
    PRESETS,
    GenerationParams,
    default_max_new_tokens,
    get_preset,
)
from chatterbox_demo.manager import ModelManager, TextError, check_text, pick_device
from chatterbox_demo.voices import VoiceError

TEXT = "Hello there, this is a short test."
DOCUMENTED = {"audio_seconds", "sample_rate", "weights", "voice", "timings", "rtf"}
EXTRAS = {"weights_identity", "device", "preset", "params"}
TIMINGS = {"conditioning_s", "t3_s", "t3_tokens", "t3_tokens_per_s", "s3gen_s", "watermark_s",
           "total_s", "build_s"}


def small(seed=0, tokens=12, **kwargs):
    return GenerationParams(seed=seed, max_new_tokens=tokens, **kwargs)


@pytest.fixture(scope="module")
def first(tiny_manager):
    return tiny_manager.generate(TEXT, "calm-mid", small(seed=1))


def test_generate_returns_float32_audio_and_the_report(first, tiny_manager):
    wav, report = first.wav, first.report
    assert isinstance(wav, np.ndarray) and wav.dtype == np.float32 and wav.ndim == 1
    assert wav.size > 0 and np.isfinite(wav).all()
    assert first.sample_rate == report["sample_rate"] == 24000
    assert set(report) == DOCUMENTED | EXTRAS
    assert set(report["voice"]) == {"name", "source"}
    assert set(report["timings"]) == TIMINGS
    assert report["voice"] == {"name": "calm-mid", "source": "memory"}
    assert report["weights"] == "tiny"
    assert report["weights_identity"] == tiny_manager.loaded.identity
    assert report["device"] == "cpu" and report["preset"] == "cached"
    assert report["audio_seconds"] == pytest.approx(len(wav) / 24000, abs=1e-3)

    t = report["timings"]
    assert isinstance(t["t3_tokens"], int) and 1 <= t["t3_tokens"] <= 12
    for key in TIMINGS - {"t3_tokens"}:
        assert isinstance(t[key], float) and t[key] >= 0, key
    assert t["t3_s"] > 0 and t["s3gen_s"] > 0
    assert t["t3_tokens_per_s"] == pytest.approx(t["t3_tokens"] / t["t3_s"], rel=0.05)
    stages = t["conditioning_s"] + t["t3_s"] + t["s3gen_s"] + t["watermark_s"]
    assert stages <= t["total_s"] + 1e-3
    assert report["rtf"] == pytest.approx(t["total_s"] / report["audio_seconds"], rel=0.01)
    assert report["params"]["seed"] == 1 and report["params"]["max_new_tokens"] == 12
    assert report["params"]["exaggeration"] == 0.5  # the voice's own, since params had None


def test_same_seed_same_audio_other_seed_other_audio(first, tiny_manager):
    again = tiny_manager.generate(TEXT, "calm-mid", small(seed=1))
    assert np.array_equal(again.wav, first.wav)
    other = tiny_manager.generate(TEXT, "calm-mid", small(seed=2))
    n = min(len(other.wav), len(first.wav))
    assert not np.array_equal(other.wav[:n], first.wav[:n])


def test_exaggeration_reaches_t3(tiny_manager, monkeypatch):
    # With random weights a changed exaggeration rarely changes the sampled tokens, so
    # check what T3 is given rather than the audio.
    t3 = tiny_manager.loaded.tts.t3
    seen = []
    real = t3.inference

    def spy(**kwargs):
        seen.append(float(kwargs["t3_cond"].emotion_adv.reshape(-1)[0]))
        return real(**kwargs)

    monkeypatch.setattr(t3, "inference", spy)
    loud = tiny_manager.generate(TEXT, "calm-mid", small(seed=1, tokens=6, exaggeration=1.5))
    own = tiny_manager.generate(TEXT, "calm-mid", small(seed=1, tokens=6))
    assert seen == [1.5, 0.5]
    assert loud.report["params"]["exaggeration"] == 1.5
    assert own.report["params"]["exaggeration"] == 0.5


def test_voice_changes_the_audio(first, tiny_manager):
    other_voice = tiny_manager.generate(TEXT, "narrator-low", small(seed=1))
    assert other_voice.report["voice"]["name"] == "narrator-low"
    n = min(len(other_voice.wav), len(first.wav))
    assert not np.array_equal(other_voice.wav[:n], first.wav[:n])


def test_generation_leaves_cached_conditionals_untouched(tiny_manager):
    voice = tiny_manager.library.get("calm-mid")
    conds, _ = tiny_manager.library.conditionals(voice)
    before = {k: v.clone() for k, v in conds.gen.items() if torch.is_tensor(v)}
    emotion = conds.t3.emotion_adv.clone()
    tiny_manager.generate(TEXT, "calm-mid", small(seed=4, exaggeration=2.0))
    assert torch.equal(conds.t3.emotion_adv, emotion)
    for key, value in before.items():
        assert conds.gen[key].dtype == value.dtype and torch.equal(conds.gen[key], value), key


@pytest.mark.parametrize("budget", [3, 9])
def test_max_new_tokens_bounds_t3_tokens(tiny_manager, budget):
    result = tiny_manager.generate(TEXT, "calm-mid", small(seed=3, tokens=budget))
    assert 1 <= result.report["timings"]["t3_tokens"] <= budget
    assert result.report["params"]["max_new_tokens"] == budget


@pytest.mark.parametrize(
    "sampled,valid",
    [([[]], 0), ([[6561 + 1]], 0), ([[17]], 1), ([[17, 6561 + 1]], 1), ([[17, 6900]], 1),
     ([[17, 23]], 2), ([[17, 23, 6561 + 1, 40]], 2)],
)
def test_too_few_speech_tokens_is_a_generation_error(tiny_manager, monkeypatch, sampled,
                                                     valid):
    # S3Gen cannot decode a single speech token (upstream fails with a tensor size
    # mismatch); the user gets GenerationError, which the UI and CLI report as one line.
    t3 = tiny_manager.loaded.tts.t3
    monkeypatch.setattr(t3, "inference",
                        lambda **kwargs: torch.tensor(sampled, dtype=torch.long).reshape(1, -1))
    if valid < 2:
        with pytest.raises(pipeline.GenerationError, match="stopped before producing any"):
            tiny_manager.generate(TEXT, "calm-mid", small())
    else:
        result = tiny_manager.generate(TEXT, "calm-mid", small())
        assert result.report["timings"]["t3_tokens"] == len(sampled[0])
        # Two mel frames of 480 samples a token, less one when the reference clip's mel
        # length is odd.
        assert len(result.wav) in ((2 * valid - 1) * 480, 2 * valid * 480)


def test_one_token_budget_is_refused_cleanly(tiny_manager):
    # The smallest budget the settings allow must not crash inside S3Gen.
    with pytest.raises(pipeline.GenerationError):
        tiny_manager.generate(TEXT, "calm-mid", small(tokens=1))


def test_default_token_budget_comes_from_the_text(tiny_manager, monkeypatch):
    seen = []
    real_run = pipeline.run

    def spy(tts, text, conds, exaggeration, params, max_new_tokens, *args, **kwargs):
        seen.append(max_new_tokens)
        # 4 tokens keep the test fast.
        return real_run(tts, text, conds, exaggeration, params, 4, *args, **kwargs)

    monkeypatch.setattr(pipeline, "run", spy)
    result = tiny_manager.generate(TEXT, "calm-mid", GenerationParams(seed=0))
    assert seen == [default_max_new_tokens(TEXT)]
    assert result.report["params"]["max_new_tokens"] == default_max_new_tokens(TEXT)


@pytest.mark.parametrize(
    "text,words",
    [
        ("", "Enter some text"),
        ("    ", "Enter some text"),
        ("\n\t \r\n", "Enter some text"),
        ("\x00\x01\x02", "Enter some text"),
        ("...!?", "letters or digits"),
        ("— – … ¿¡", "letters or digits"),
        ("x" * (MAX_TEXT_CHARS + 1), f"the limit is {MAX_TEXT_CHARS}"),
        (None, "must be a string"),
        (b"bytes", "must be a string"),
        ("bad \ud800 surrogate", "unpaired surrogates"),
    ],
)
def test_bad_text_raises_without_touching_the_model(tmp_path, monkeypatch, text, words):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was used")

    monkeypatch.setattr(manager_mod.weights, "load", no_model)
    monkeypatch.setattr(pipeline, "run", no_model)
    fresh = ModelManager("tiny", device="cpu", cache_dir=tmp_path, shipped_voices=None)
    with pytest.raises(TextError, match=words):
        fresh.generate(text, "calm-mid", small())
    assert fresh.loaded is None
    assert not tmp_path.joinpath("voices.json").exists()


def test_text_error_on_a_loaded_manager_runs_nothing(tiny_manager, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was used")

    monkeypatch.setattr(pipeline, "run", no_model)
    monkeypatch.setattr(tiny_manager._library, "conditionals", no_model)
    with pytest.raises(TextError):
        tiny_manager.generate("  ?!  ", "calm-mid")


def test_check_text_accepts_and_cleans():
    assert check_text("x" * MAX_TEXT_CHARS) == "x" * MAX_TEXT_CHARS
    assert check_text("  hi\x07 there\n") == "hi  there"
    assert check_text("42") == "42"
    assert check_text("Ça va?") == "Ça va?"
    assert issubclass(TextError, ValueError)


def test_baseline_preset_recomputes_every_call(tiny_manager, monkeypatch):
    library = tiny_manager.library
    calls = []
    real = library.compute

    def counting(path, exaggeration):
        calls.append(path)
        return real(path, exaggeration)

    monkeypatch.setattr(library, "compute", counting)
    baseline = get_preset("baseline")
    for _ in range(2):
        result = tiny_manager.generate(TEXT, "bright-high", small(seed=5, tokens=6),
                                       config=baseline)
        assert result.report["voice"]["source"] == "computed"
        assert result.report["preset"] == "baseline"
        assert result.report["timings"]["conditioning_s"] > 0
    assert len(calls) == 2
    cached = tiny_manager.generate(TEXT, "bright-high", small(seed=5, tokens=6))
    assert cached.report["voice"]["source"] == "memory"
    assert cached.report["preset"] == "cached"
    assert len(calls) == 2
    assert np.array_equal(cached.wav, result.wav)  # the same conditionals either way


def test_apply_preset(tiny_manager, monkeypatch):
    monkeypatch.setattr(tiny_manager, "config", tiny_manager.config)
    monkeypatch.setattr(tiny_manager, "preset", tiny_manager.preset)
    assert tiny_manager.apply_preset("baseline").cached_conditionals is False
    assert tiny_manager.status()["preset"] == "baseline"
    result = tiny_manager.generate(TEXT, "calm-mid", small(tokens=6))
    assert result.report["voice"]["source"] == "computed"
    assert result.report["preset"] == "baseline"
    with pytest.raises(ValueError, match="available: baseline, cached"):
        tiny_manager.apply_preset("warp")
    assert tiny_manager.preset == "baseline"  # a refused preset changes nothing


def test_applying_a_cpu_fast_decoder_records_its_traced_step(tiny_manager, monkeypatch):
    """The traced decode step is recorded with the variant, when the configuration is
    applied (reported as its warm-up), so no generation's timings include it."""
    from chatterbox_demo.config import get_preset
    from chatterbox_demo.fast_t3 import _TRACED_STEPS

    monkeypatch.setattr(tiny_manager, "config", tiny_manager.config)
    monkeypatch.setattr(tiny_manager, "preset", tiny_manager.preset)
    t3, _ = tiny_manager.variant(get_preset("t3-int8"))
    _TRACED_STEPS.pop(t3, None)  # whatever earlier tests generated with it
    tiny_manager.apply_preset("t3-int8")
    assert (2, torch.float32) in _TRACED_STEPS[t3]
    assert tiny_manager.last_apply_s > 0


def test_voice_file_for_trusted_callers(tiny_manager, make_wav):
    path = make_wav("adhoc.wav", seed=21)
    one = tiny_manager.generate(TEXT, voice_file=path, params=small(seed=6, tokens=6))
    assert one.report["voice"] == {"name": "adhoc.wav", "source": "computed"}
    two = tiny_manager.generate(TEXT, voice_file=path, params=small(seed=6, tokens=6))
    assert two.report["voice"] == {"name": "adhoc.wav", "source": "memory"}
    assert np.array_equal(one.wav, two.wav)
    assert tiny_manager.library.names() == list(SHIPPED)  # not added to the library


def test_default_voice_is_the_first_listed(tiny_manager):
    result = tiny_manager.generate(TEXT, None, small(tokens=6))
    assert result.report["voice"]["name"] == tiny_manager.library.names()[0] == SHIPPED[0]


def test_unknown_voice_lists_the_available_ones(tiny_manager):
    with pytest.raises(VoiceError) as info:
        tiny_manager.generate(TEXT, "nobody", small())
    message = str(info.value)
    assert message.startswith("Unknown voice 'nobody'; available: ")
    for name in SHIPPED:
        assert name in message


def test_status(tiny_manager):
    status = tiny_manager.status()
    assert status["weights"] == "tiny" and status["device"] == "cpu"
    assert status["weights_identity"] == tiny_manager.loaded.identity
    assert "noise" in status["banner"]


def test_load_is_once_and_reports_progress(tiny_manager):
    seen = []
    assert tiny_manager.load(lambda f, m: seen.append(m)) is tiny_manager.loaded
    assert seen == []  # already loaded: returns at once


def test_fresh_manager_reports_load_progress(make_manager):
    seen = []
    fresh = make_manager(load=False)
    assert fresh.loaded is None
    fresh.load(lambda fraction, message: seen.append((fraction, message)))
    assert seen[0][0] < seen[-1][0] == 1.0 and seen[-1][1] == "Ready"
    assert [f for f, _ in seen] == sorted(f for f, _ in seen)
    assert fresh.list_voices()[0].name == SHIPPED[0]


def test_unknown_weights_spec_fails_before_loading():
    with pytest.raises(ValueError, match="Unknown weights source 'nope'"):
        ModelManager("nope", device="cpu")


def test_pick_device_auto_is_cpu_here():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert pick_device("auto") == "cpu"
    assert pick_device(None) == "cpu"
    assert pick_device(" CPU ") == "cpu"


def test_pick_device_refuses_unavailable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == "cpu"
    for name in ("cuda", "mps"):
        with pytest.raises(ValueError) as info:
            pick_device(name)
        assert str(info.value) == f"Device {name!r} is not available here; use cpu or auto."
    with pytest.raises(ValueError, match="Unknown device 'tpu'; available: auto, cuda, mps, cpu"):
        pick_device("tpu")
    with pytest.raises(ValueError, match="'cuda' is not available"):
        ModelManager("tiny", device="cuda")


def test_pick_device_prefers_cuda_when_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == "cuda"
    assert pick_device("cuda") == "cuda"


def test_instance_reads_the_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(ModelManager, "_instance", None)
    monkeypatch.setenv("CHATTERBOX_WEIGHTS", "tiny")
    monkeypatch.setenv("CHATTERBOX_DEVICE", "cpu")
    monkeypatch.setenv("CHATTERBOX_DEMO_CACHE", str(tmp_path))
    one = ModelManager.instance()
    assert one is ModelManager.instance()  # one per process
    assert (one.weights_spec, one.device, one.cache_dir) == ("tiny", "cpu", tmp_path)
    assert one.loaded is None  # lazy: nothing is built until first use


# --- building, caching and warming model variants -------------------------------------------


@pytest.fixture
def own_variants(tiny_manager, monkeypatch):
    """The shared manager with its variant caches, warm-ups, notices and configuration
    restored after the test; the caches start empty (the pristine modules are the loaded
    model, so nothing is lost)."""
    for name in ("_t3_variants", "_s3gen_variants"):
        monkeypatch.setattr(tiny_manager, name, OrderedDict())
    monkeypatch.setattr(tiny_manager, "_warmed", set())
    monkeypatch.setattr(tiny_manager, "notices", [])
    monkeypatch.setattr(tiny_manager, "config", tiny_manager.config)
    monkeypatch.setattr(tiny_manager, "preset", tiny_manager.preset)
    return tiny_manager


def cache_state(manager):
    return list(manager._t3_variants.items()), list(manager._s3gen_variants.items())


def test_out_of_memory_on_a_cpu_is_recognised_by_torchs_message(own_variants, monkeypatch):
    """torch's CPU allocator raises a plain RuntimeError, not MemoryError: the switch must
    still fall back to the configuration it had."""
    def huge(pristine, config):
        return torch.empty(2**50, dtype=torch.uint8)  # 1 PB: more than any address space

    monkeypatch.setattr(manager_mod, "build_t3", huge)
    with pytest.raises(manager_mod.OutOfMemory, match="Not enough memory.*staying on cached"):
        own_variants.apply_preset("t3-bf16")
    assert own_variants.preset == "cached"
    assert "Not enough memory" in own_variants.notices[-1]


def test_other_runtime_errors_are_not_taken_for_out_of_memory(own_variants, monkeypatch):
    def broken(pristine, config):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(manager_mod, "build_t3", broken)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        own_variants.apply_preset("t3-bf16")
    assert own_variants.notices == []
    assert manager_mod.is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert manager_mod.is_out_of_memory(MemoryError())
    assert not manager_mod.is_out_of_memory(ValueError("can't allocate memory"))


def test_a_failed_s3gen_build_leaves_the_cache_as_it_was(own_variants, monkeypatch):
    """T3 is built first; when S3Gen then runs out of memory, neither is the new T3 cached
    nor the active configuration's T3 dropped to make room for it."""
    monkeypatch.setattr(manager_mod, "MAX_VARIANTS", 1)
    own_variants.apply_preset("t3-bf16")
    active_t3, _ = own_variants.variant(own_variants.config)
    before = cache_state(own_variants)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(manager_mod, "build_s3gen", no_memory)
    with pytest.raises(manager_mod.OutOfMemory, match="S3Gen variant"):
        own_variants.apply_preset("cpu-fast")  # a new T3 and a new S3Gen
    assert cache_state(own_variants) == before
    assert own_variants.preset == "t3-bf16"
    assert not any("dropped" in notice for notice in own_variants.notices)
    assert own_variants.variant(own_variants.config)[0] is active_t3  # nothing rebuilt


def test_the_pristine_modules_do_not_count_against_the_bound(own_variants, monkeypatch):
    """They are the loaded model itself: keeping them costs nothing, dropping them would
    free nothing, so only the copies are bounded."""
    monkeypatch.setattr(manager_mod, "MAX_VARIANTS", 1)
    tts = own_variants.loaded.tts
    own_variants.variant(PRESETS["cached"])
    bf16, _ = own_variants.variant(PRESETS["t3-bf16"])
    own_variants.variant(PRESETS["cached"])  # the pristine one used again: nothing dropped
    assert list(own_variants._t3_variants.values()) == [bf16, tts.t3]
    assert own_variants.notices == []
    own_variants.variant(PRESETS["t3-int8"])  # a second copy: the first one goes
    assert tts.t3 in own_variants._t3_variants.values()
    assert bf16 not in own_variants._t3_variants.values()
    assert len(own_variants.notices) == 1 and "T3 variant bf16" in own_variants.notices[0]
    # The estimate for taking turns agrees: one copy besides the pristine one fits.
    assert own_variants.variants_fit([(PRESETS["cached"], None), (PRESETS["t3-bf16"], None)])
    assert not own_variants.variants_fit([(PRESETS["t3-bf16"], None),
                                          (PRESETS["t3-int8"], None)])


def test_notices_are_bounded(own_variants, monkeypatch):
    monkeypatch.setattr(manager_mod, "MAX_VARIANTS", 1)
    monkeypatch.setattr(manager_mod, "MAX_NOTICES", 2)
    for name in ("t3-bf16", "t3-int8", "t3-bf16", "t3-int8"):  # three evictions
        own_variants.variant(PRESETS[name])
    assert len(own_variants.notices) == 2
    assert "T3 variant fp32/int8-dynamic" in own_variants.notices[0]
    assert "T3 variant bf16" in own_variants.notices[1]


def test_a_compiled_configuration_is_warmed_up_per_decoder_too(own_variants, monkeypatch):
    """The same compiled weights run by another decoder compile other code: switching to
    it warms up again, and switching back to one already warmed does not."""
    warmed = []
    monkeypatch.setattr(own_variants, "_warm_up", warmed.append)
    stock = dataclasses.replace(PRESETS["cached"], compile_mode="default")
    fast = dataclasses.replace(stock, t3_decoder="fast", t3_voice_prefix=True)
    for config in (stock, fast, stock, fast):
        own_variants.apply(config)
    assert warmed == [stock, fast]


def test_compiled_variants_are_built_at_and_kept_per_their_own_thread_count(own_variants,
                                                                           monkeypatch):
    """Inductor writes the thread count into its code: int8-static compiled under the last
    configuration's count ran at it for good, and a compiled variant was reused whatever
    cpu_threads a later configuration asked for."""
    from chatterbox_demo import optimizations

    compiled_at = []

    def static_int8(s3gen, calibration, package_dir):
        compiled_at.append(torch.get_num_threads())
        return s3gen

    monkeypatch.setattr(optimizations, "apply_s3gen_int8_static", static_int8)
    static = dataclasses.replace(PRESETS["cached"], s3gen_quant="int8-static")
    before = torch.get_num_threads()
    try:
        own_variants.apply(dataclasses.replace(PRESETS["cached"], cpu_threads=1))
        own_variants.variant(dataclasses.replace(static, cpu_threads=2))
        assert compiled_at == [2]
        own_variants.variant(dataclasses.replace(static, cpu_threads=1))
        assert compiled_at == [2, 1]  # not the two-thread one again
    finally:
        torch.set_num_threads(before)
    compiled = dataclasses.replace(PRESETS["cached"], compile_mode="default")
    assert (optimizations.t3_variant_key(dataclasses.replace(compiled, cpu_threads=1))
            != optimizations.t3_variant_key(dataclasses.replace(compiled, cpu_threads=2)))
    # What T3 is compiled in decides its variant, not the mode's name (CUDA's
    # reduce-overhead compiles T3's layers as default: one copy, not two).
    overhead = dataclasses.replace(compiled, compile_mode="reduce-overhead")
    assert optimizations.t3_variant_key(overhead) == optimizations.t3_variant_key(compiled)


def test_a_bad_shipped_clip_is_skipped_and_named_in_the_log(make_manager, tmp_path, caplog):
    """One unreadable file among the shipped voices costs that voice, not the app."""
    voices = tmp_path / "voices"
    shutil.copytree(VOICES_DIR, voices)
    (voices / "broken.wav").write_bytes(b"not a wav file")
    fresh = make_manager(shipped_voices=voices)
    assert [v.name for v in fresh.list_voices()] == list(SHIPPED)
    assert "Skipping the shipped voice broken.wav" in caplog.text


def test_a_voice_library_that_fails_leaves_the_manager_unloaded(make_manager, monkeypatch):
    """A load() that fails while building the voice library fails again when retried,
    rather than leave a manager that claims to be loaded without a voice library."""
    real = manager_mod.VoiceLibrary.register_shipped

    def failing(self, folder, *args, **kwargs):
        raise OSError(5, "Input/output error", str(folder))

    monkeypatch.setattr(manager_mod.VoiceLibrary, "register_shipped", failing)
    fresh = make_manager(load=False)
    for _ in range(2):
        with pytest.raises(OSError, match="Input/output error"):
            fresh.load()
        assert fresh.loaded is None
    monkeypatch.setattr(manager_mod.VoiceLibrary, "register_shipped", real)
    fresh.load()
    assert fresh.list_voices()[0].name == SHIPPED[0]


def test_the_page_header_shows_notices_beside_the_weights_banner(own_variants, monkeypatch):
    """Random and tiny weights (and `auto` offline) put a banner in the header: the notices
    of dropped variants or a fallback preset must still be seen there."""
    from chatterbox_demo import ui

    monkeypatch.setattr(ui, "manager", lambda: own_variants)
    own_variants.notices.append("T3 variant bf16 was dropped to bound memory")
    header = ui.header_html()
    assert "offline-banner" in header  # the tiny weights' banner
    assert "T3 variant bf16 was dropped to bound memory" in header


def test_the_header_is_drawn_again_after_every_event_that_runs_the_model():
    """Its notices (a variant dropped to bound memory) came from synthesizing only: an A/B
    run, which builds two configurations, dropped variants without a word."""
    from chatterbox_demo import ui

    config = ui.build_demo().get_config_file()
    [header] = [c["id"] for c in config["components"]
                if "status-line" in str(c["props"].get("value"))]
    redraws = {d["trigger_after"] for d in config["dependencies"] if d["outputs"] == [header]}
    for name in ("synthesize", "compare"):
        [event] = [d["id"] for d in config["dependencies"] if d["api_name"] == name]
        assert event in redraws, name


def test_the_start_preset_out_of_memory_leaves_it_on_baseline_and_says_so(make_manager,
                                                                          monkeypatch):
    """The notices said 'staying on cpu-fast' (the preset that failed) and suggested int8
    weights for a variant that was int8 already."""
    def no_memory(pristine, config):
        raise MemoryError

    monkeypatch.setattr(manager_mod, "build_t3", no_memory)
    manager = make_manager()
    assert manager.preset == "baseline" and manager.config == PRESETS["baseline"]
    assert manager.start_config == PRESETS["baseline"]  # the API's, so it never tries again
    out_of_memory, fallback = manager.notices
    assert "staying on baseline" in out_of_memory
    assert "Or try a preset with int8" not in out_of_memory
    assert fallback.startswith("cpu-fast could not be built here") and \
        fallback.endswith("started on baseline")


def test_a_load_while_the_start_preset_builds_waits_for_it(make_manager, monkeypatch):
    """The page's start-up asks for the model and reads its preset: asked while the
    start preset was still building, load() returned at once with the placeholder
    baseline, which the page then showed and switched everyone to at its first run."""
    import threading

    building, release = threading.Event(), threading.Event()
    build_t3 = manager_mod.build_t3

    def slow_build(pristine, config):
        building.set()
        release.wait(30)
        return build_t3(pristine, config)

    monkeypatch.setattr(manager_mod, "build_t3", slow_build)
    manager = make_manager(load=False)
    threading.Thread(target=manager.load, daemon=True).start()
    assert building.wait(30)
    seen = []
    page = threading.Thread(target=lambda: seen.append((manager.load(), manager.preset)))
    page.start()
    page.join(0.5)
    assert not seen  # waiting for the start preset, not reading the placeholder
    release.set()
    page.join(30)
    assert seen[0][1] == "cpu-fast"


def test_loading_without_preparing_the_preset_builds_no_variant(make_manager):
    """The CLI's manager: synth applies the preset it runs, bench each row's; the device's
    preset built at load would cost a build and hold memory for nothing."""
    prepared = make_manager()
    assert prepared._t3_variants and prepared.preset == "cpu-fast"
    lazy = make_manager(cache_dir=prepared.cache_dir, prepare_preset=False)
    assert not lazy._t3_variants and not lazy._s3gen_variants
    lazy.apply_preset("t3-int8")
    assert [key[1] for key in lazy._t3_variants] == ["int8-dynamic"]


def test_a_measurement_does_not_keep_its_variant_in_memory(own_variants, monkeypatch):
    """bench.run keeps every row's Measurement to the end: holding its T3 kept each
    dropped variant alive, so a long run grew past the bound and 'peak MB' with it."""
    import gc
    import weakref

    from chatterbox_demo import bench

    monkeypatch.setattr(manager_mod, "MAX_VARIANTS", 1)
    measurement = bench.Measurement(own_variants, PRESETS["t3-bf16"], "Kept small.",
                                    "calm-mid", GenerationParams(max_new_tokens=4),
                                    warmup=False)
    built = weakref.ref(own_variants.variant(PRESETS["t3-bf16"])[0])
    own_variants.variant(PRESETS["t3-int8"])  # the bf16 copy is dropped
    gc.collect()
    assert built() is None
    assert measurement.t3_weight_bytes > 0


def test_a_new_page_offers_the_start_preset_not_the_last_users(make_manager, monkeypatch):
    """One visitor's run on baseline made every page opened after it start on baseline,
    with A/B's B on baseline too: a comparison of baseline with itself by default."""
    from chatterbox_demo import ui
    from chatterbox_demo.config import DEVICE_PRESETS

    manager = make_manager(shipped_voices=None)
    monkeypatch.setattr(ui, "manager", lambda: manager)
    manager.apply_preset("baseline")
    _, _, synth_preset, b_preset, *_ = ui.startup(progress=lambda *args, **kwargs: None)
    assert synth_preset == b_preset == manager.start_preset == DEVICE_PRESETS["cpu"]
    assert manager.preset == "baseline"  # the header still says what is applied now
