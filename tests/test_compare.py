"""The A/B comparison: both sides alike, B's fidelity read for a listener, stopping
between sides, and the UI's panels turned into configurations."""

from __future__ import annotations

import csv
import dataclasses
import math
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from chatterbox_demo import fidelity, ui
from chatterbox_demo.compare import (
    TABLE_HEADERS,
    Comparison,
    Fidelity,
    audio_fidelity,
    compare,
    compare_steps,
)
from chatterbox_demo.config import PRESETS, GenerationParams, get_preset
from chatterbox_demo.manager import Synthesis

PARAMS = GenerationParams(seed=3, max_new_tokens=20)


def test_same_numerics_give_identical_audio_and_say_so(tiny_manager):
    result = compare(tiny_manager, "Compare me.", "calm-mid", PARAMS, get_preset("baseline"),
                     get_preset("cached"))
    assert result.a["t3_tokens"] == result.b["t3_tokens"] == 20
    assert result.a["voice_source"] == "computed" and result.b["voice_source"] != "computed"
    fidelity = result.fidelity
    assert math.isinf(fidelity.mel_snr_db) and fidelity.same_tokens
    assert fidelity.reading() == "B's audio is identical to A's."
    rows = {row[0]: row for row in result.rows()}
    assert rows["conditioning (s)"][3] == "–"  # B skipped the stage: no ratio
    assert rows["total (s)"][3] == round(result.a["total_s"] / result.b["total_s"], 2)
    assert len(result.chart().axes[0].patches) == 8  # 4 stages x 2 sides
    assert len(result.spectrograms().axes) == 2


def test_a_stage_served_from_a_cache_gets_no_ratio():
    """At full size a cached voice's conditioning takes about 0.1 ms, not 0: the table
    showed 2.28 s against 0.0001 s as a 22795x speedup. Under a millisecond it is a dash."""
    a = {"conditioning_s": 2.2795, "t3_s": 3.0, "total_s": 9.0}
    b = {"conditioning_s": 0.0001, "t3_s": 1.5, "total_s": 4.5}
    rows = {row[0]: row[3] for row in Comparison(a, b).rows()}
    assert rows["conditioning (s)"] == "–"
    assert rows["T3 (s)"] == 2.0 and rows["total (s)"] == 2.0


def test_warm_up_times_get_no_ratio():
    """A built variant's warm-up is a cache lookup (a few ms); a compiled one's, minutes.
    The table showed their ratio, 0.0, as B's speedup."""
    a = {"warmup_s": 0.004, "total_s": 9.0}
    b = {"warmup_s": 75.8, "total_s": 4.5}
    rows = {row[0]: row for row in Comparison(a, b).rows()}
    assert rows["warm-up (s)"] == ["warm-up (s)", 0.004, 75.8, "–"]
    assert rows["total (s)"][3] == 2.0


def test_sides_that_did_unequal_work_are_shown_and_named():
    """Only the token budget is shared: a side that samples the stop token sooner, or
    renders fewer speakable tokens, does less work, and "B ran 1.47x faster" said nothing
    of it."""
    a = {"total_s": 4.0, "t3_tokens": 80, "audio_seconds": 2.52, "rtf": 1.59}
    b = {"total_s": 2.72, "t3_tokens": 80, "audio_seconds": 2.68, "rtf": 1.01}
    result = Comparison(a, b)
    rows = {row[0]: row for row in result.rows()}
    assert rows["T3 speech tokens"] == ["T3 speech tokens", 80, 80, "–"]
    assert rows["audio (s)"] == ["audio (s)", 2.52, 2.68, "–"]
    result.fidelity = Fidelity(20.0, True, None)
    summary = ui.summary_markdown(result, "a", "b", repeats=1)
    assert ("A decoded 80 speech tokens into 2.52 s of audio, B 80 into 2.68 s: the times "
            "cover unequal work, so compare the RTF") in summary
    same = Comparison(a, {**b, "audio_seconds": 2.52})
    same.fidelity = Fidelity(20.0, True, None)
    assert "unequal" not in ui.summary_markdown(same, "a", "b", repeats=1)


def record_generations(manager, monkeypatch) -> list[tuple]:
    """Every generate call's (configuration, text, voice, params, ignore_stop), in order."""
    calls = []
    real = manager.generate

    def generate(text, voice, params, config=None, **kwargs):
        calls.append((config, text, voice, params, kwargs.get("ignore_stop", False)))
        return real(text, voice, params, config, **kwargs)

    monkeypatch.setattr(manager, "generate", generate)
    return calls


def test_both_sides_are_warmed_up_with_the_generation_they_are_timed_on(tiny_manager,
                                                                         monkeypatch):
    """A side's first call at a new audio length costs extra once (HiFT: 0.7 s against
    0.02 s on the tiny model); only a compiled side was warmed up, so A=cached against
    B=cached in a fresh process put B 1.37x "faster". Each side now runs the measured
    generation once, untimed, before its timed run."""
    calls = record_generations(tiny_manager, monkeypatch)
    cached = get_preset("cached")
    result = compare(tiny_manager, "Warm me.", "calm-mid", PARAMS, cached, cached)
    assert len(calls) == 4  # A's warm-up and run, then B's
    assert calls[0] == calls[1] == calls[2] == calls[3]
    assert result.a["warmup_s"] > 0 and result.b["warmup_s"] > 0


def test_repeats_alternate_which_side_runs_first(tiny_manager, monkeypatch):
    """A always ran before B; now the order goes A B B A A B, so neither side is always
    the first of a pair."""
    calls = record_generations(tiny_manager, monkeypatch)
    a, b = get_preset("cached"), dataclasses.replace(get_preset("cached"), cfm_steps=2)
    compare(tiny_manager, "Turns.", "calm-mid", PARAMS, a, b, repeats=3)
    side = {a: "A", b: "B"}
    # A's warm-up and first run, B's warm-up and first run, then the timed pairs B A, A B.
    assert "".join(side[call[0]] for call in calls) == "AABBBAAB"


def test_the_table_header_says_what_every_row_holds():
    """The header said "speedup (A/B)" while T3 tokens/s was B/A and peak memory no speed
    at all: every ratio is now above 1 where B did better, and the header says so."""
    a = {"conditioning_s": 0.5, "t3_s": 2.0, "s3gen_s": 3.0, "watermark_s": 0.2,
         "total_s": 5.7, "t3_tokens_per_s": 50.0, "rtf": 1.2, "warmup_s": 4.0,
         "t3_weights_mb": 1952.0, "peak_mem_mb": 6000.0}
    b = {key: value * 2 if key == "t3_tokens_per_s" else value / 2
         for key, value in a.items()}  # B better on every figure, by 2x
    ratios = {row[0]: row[3] for row in Comparison(a, b).rows()}
    assert ratios.pop("warm-up (s)") == "–"
    # The process's peak holds both sides' variants: no ratio of it is B's gain.
    assert ratios.pop("process peak memory (MB)") == "–"
    assert ratios.pop("T3 speech tokens") == ratios.pop("audio (s)") == "–"  # the work done
    assert set(ratios.values()) == {2.0}, ratios
    assert TABLE_HEADERS == ["", "A", "B", "B's gain over A (x, >1: B better)"]
    config = ui.build_demo().get_config_file()
    [table] = [c["props"] for c in config["components"]
               if c["props"].get("elem_id") == "ab-table"]
    assert table["headers"] == TABLE_HEADERS


def test_the_same_audio_verdict_does_not_depend_on_loudness():
    """Over log-mels taken from a fixed power (log of 1), quieter audio scored higher: one
    pair read 11.9, 19.6 and 26.0 dB at gains 1, 0.1 and 0.01, the last "no audible
    difference". Relative to A's peak, a gain both share changes nothing."""
    rng = np.random.default_rng(0)
    t = np.arange(48000) / 24000
    envelope = np.clip(np.sin(2 * np.pi * 1.5 * t), 0, None)  # speech-like pauses
    clean = envelope * (0.4 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 660 * t))
    noisy = clean + 0.1 * envelope * rng.standard_normal(t.size)
    snrs = []
    for gain in (1, 0.1, 0.01):
        a, b = ((clip * gain).astype(np.float32) for clip in (clean, noisy))
        snrs.append(audio_fidelity(Synthesis(a, 24000, speech_tokens=[1]),
                                   Synthesis(b, 24000, speech_tokens=[1])).mel_snr_db)
    assert math.isfinite(snrs[0]) and max(snrs) - min(snrs) < 0.1, snrs


def test_snr_against_a_silent_reference_is_minus_infinity_not_an_error():
    """log10(0) raised a math domain error; strict JSON writes -inf as null, like inf."""
    import torch

    zeros = torch.zeros(80, 10)
    assert fidelity.snr_db(zeros, torch.ones(80, 10)) == -math.inf
    assert fidelity.snr_db(zeros, zeros) == math.inf
    assert "identical" not in Fidelity(-math.inf, True, None).reading()


def test_fewer_cfm_steps_keep_the_tokens_and_change_the_sound(tiny_manager):
    fewer = dataclasses.replace(get_preset("cached"), cfm_steps=2)
    fidelity = compare(tiny_manager, "Compare me.", "calm-mid", PARAMS, get_preset("cached"),
                       fewer).fidelity
    assert fidelity.same_tokens and not math.isinf(fidelity.mel_snr_db)
    assert "Same speech tokens" in fidelity.reading()


def test_different_tokens_are_named_with_where_they_part():
    wav = np.sin(np.linspace(0, 200, 24000)).astype(np.float32)
    a = Synthesis(wav, 24000, speech_tokens=[1, 2, 3, 4])
    b = Synthesis(wav * 0.9, 24000, speech_tokens=[1, 2, 9, 4])
    fidelity = audio_fidelity(a, b)
    assert not fidelity.same_tokens and fidelity.first_difference == 2
    assert "from token 2 on" in fidelity.reading()
    assert Fidelity(30.0, True, None).reading().startswith("Same speech tokens and 30.0 dB")


def test_a_cancel_between_sides_skips_b(tiny_manager):
    steps = list(compare_steps(tiny_manager, "Compare me.", "calm-mid", PARAMS,
                               get_preset("cached"), get_preset("cached"),
                               cancelled=lambda: True))
    assert len(steps) == 1 and steps[0].b is None
    assert steps[0].rows()[0][2] is None
    # The page's table says so in B's column rather than printing None as "null".
    table = ui.comparison_outputs(steps[0], "cached", "cached")[2]
    assert [row[2] for row in table] == ["running…"] * len(table)
    table = ui.comparison_table(steps[0], "not run")
    assert [row[2] for row in table] == ["not run"] * len(table)


def test_a_cancel_between_turns_ends_the_repeats_with_what_ran(tiny_manager):
    """Cancel was checked only between A and B: with 5 repeats it ran every turn."""
    asked = iter([False, False, True])  # after A; after B; after the first turn
    steps = list(compare_steps(tiny_manager, "Compare me.", "calm-mid", PARAMS,
                               get_preset("cached"), get_preset("cached"), repeats=4,
                               cancelled=lambda: next(asked)))
    done = steps[-1]
    assert done.b is not None and done.runs == 2
    summary = ui.comparison_outputs(done, "cached", "cached", repeats=4)[3]
    assert "Cancelled after 2 of 4 runs per side" in summary


def test_a_configuration_this_device_cannot_run_is_refused_before_anything_runs(
        tiny_manager):
    # And says which one does: the picker lists every preset.
    with pytest.raises(ValueError, match=r"Configuration B cannot run on cpu: .*CUDA.*\. "
                                         r"cpu-fast runs here\.$"):
        next(compare_steps(tiny_manager, "Hi.", "calm-mid", PARAMS, get_preset("cached"),
                           get_preset("gpu-fast")))


def test_text_longer_than_one_generation_is_refused_before_anything_runs(tiny_manager):
    # A comparison times one generation per run; README says so beside the long-text limit.
    with pytest.raises(ValueError, match="the limit is 1000"):
        next(compare_steps(tiny_manager, "a" * 1001, "calm-mid", PARAMS, get_preset("cached"),
                           get_preset("cached")))


@pytest.fixture
def ui_manager(tiny_manager, monkeypatch):
    monkeypatch.setattr(ui, "manager", lambda: tiny_manager)
    return tiny_manager


def test_a_side_that_fails_is_named_in_the_summary(ui_manager, monkeypatch):
    """An error in B shows as the page's message, and the summary no longer says B is
    running (a browser test once waited on "running B…" beside the error)."""
    import gradio as gr

    real = ui_manager.generate

    def generate(text, voice, params, config=None, **kwargs):
        if config == get_preset("fast-decoder"):
            raise RuntimeError("broken on purpose")
        return real(text, voice, params, config, **kwargs)

    monkeypatch.setattr(ui_manager, "generate", generate)
    shown = []
    with pytest.raises(gr.Error, match="RuntimeError"):
        for outputs in ui.run_compare("Compare me.", "calm-mid", 0, 8, "cached",
                                      "fast-decoder"):
            shown.append(outputs)
    assert "running B" in shown[0][3]  # A's result, B under way
    assert shown[-1][3] == "A (**cached**) done; B (**fast-decoder**) failed: see the message."
    assert shown[-1][:2] == (gr.skip(),) * 2  # A's audio stays
    assert [row[2] for row in shown[-1][2]] == ["failed"] * len(shown[-1][2])
    assert [row[1] for row in shown[-1][2]] == [row[1] for row in shown[0][2]]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips_through_the_advanced_panel(name, ui_manager):
    assert ui.config_from_fields(ui.preset_fields(name)) == PRESETS[name]
    assert ui.preset_name(PRESETS[name]) == name


def test_the_panel_marks_what_cannot_run_here_with_the_reason(ui_manager):
    assert ui.option_reason("t3_quant", "int8-dynamic") is None
    assert "CUDA" in ui.option_reason("cuda_graphs", True)
    assert "bf16" in ui.option_reason("t3_dtype", "fp16")
    assert ui.availability_markdown(*ui.preset_fields("cpu-fast")).startswith("✓ **cpu-fast**")
    gpu = ui.availability_markdown(*ui.preset_fields("gpu-fast"))
    assert gpu.startswith("✗ **gpu-fast** cannot run on CPU") and "CUDA" in gpu
    values = ui.preset_fields("cached")
    values[ui.CONFIG_FIELDS.index("cfm_steps")] = 2.5
    assert "cfm_steps must be a whole number" in ui.availability_markdown(*values)


def test_collect_configs_names_the_side_at_fault(ui_manager):
    request = types.SimpleNamespace(session_hash="s1")
    good = ui.preset_fields("cached")
    a, b = ui.collect_configs(request, *good, *good)
    assert a == b == dataclasses.asdict(PRESETS["cached"])
    with pytest.raises(ui.gr.Error, match="Configuration B cannot run on cpu: .*CUDA"):
        ui.collect_configs(request, *good, *ui.preset_fields("gpu-fast"))


def test_a_new_run_does_not_undo_the_cancel_of_the_one_still_running():
    """Run, Cancel, Run again: the second click's check reset the flag, so the first
    comparison ran to its end."""
    cancels = ui.CancelRequests()
    cancels.start("alice")
    assert cancels.cancel("alice")
    cancels.start("alice")  # the second click, while the first still runs
    assert cancels.is_cancelled("alice")
    cancels.finish("alice")
    cancels.start("alice")
    assert not cancels.is_cancelled("alice")


def test_cancel_with_nothing_running_leaves_the_last_verdict():
    request = types.SimpleNamespace(session_hash="nobody-running")
    assert ui.cancel_compare(request) == ui.gr.skip()


@pytest.mark.parametrize("ratio, words", [(2.0, "**2.00x** faster"),
                                          (0.5, "**2.00x** slower")])
def test_a_slower_b_is_said_as_how_many_times_slower(ratio, words, monkeypatch):
    result = Comparison({"total_s": 1.0}, {"total_s": 1.0 / ratio})
    monkeypatch.setattr(Comparison, "fidelity", Fidelity(30.0, True, None))
    assert words in ui.summary_markdown(result, "a", "b", repeats=1)


def test_the_summary_is_not_html_escaped_beyond_what_markdown_needs(monkeypatch):
    """API callers read B&#x27;s for B's."""
    result = Comparison({"total_s": 1.0}, {"total_s": 1.0})
    monkeypatch.setattr(Comparison, "fidelity", Fidelity(math.inf, True, None))
    assert "&#x27;" not in ui.summary_markdown(result, "a", "b", repeats=1)


@pytest.mark.parametrize("repeats", [2.5, 1.5])
def test_a_fractional_repeat_count_is_refused_before_anything_runs(repeats, ui_manager,
                                                                   monkeypatch):
    monkeypatch.setattr(ui_manager, "generate", None)  # nothing may run
    with pytest.raises(ui.gr.Error, match="repeats must be a whole number"):
        next(ui.run_compare("Compare me.", "calm-mid", 0, 8, "cached", "cached", repeats))


def test_a_panel_number_out_of_range_is_named_with_its_side(ui_manager):
    """Gradio's own bound check said "Value -1 is less than minimum value 0." without
    naming which of the panels' fields, and the line under the panel still said ✓."""
    values = ui.preset_fields("cached")
    values[ui.CONFIG_FIELDS.index("cpu_threads")] = -1
    request = types.SimpleNamespace(session_hash="s1")
    # The panel's label offers 0 for the default: the message does too.
    with pytest.raises(ui.gr.Error, match=r"Configuration B: cpu_threads must be between 1 "
                                          r"and 256 \(got -1\); or 0 for the default"):
        ui.collect_configs(request, *ui.preset_fields("cached"), *values)
    assert ui.availability_markdown(*values).startswith("✗ not a valid configuration")
    with ui.gr.Blocks():
        _, fields, _ = ui._config_panel("A", "cached")
    for name, field in zip(ui.CONFIG_FIELDS, fields, strict=True):
        if name in ("cpu_threads", "cfm_steps", "prompt_seconds"):
            assert field.preprocess(-1) == -1  # left to the configuration's own check


def test_cancel_applies_to_the_asking_session_only():
    cancels = ui.CancelRequests()
    cancels.start("alice")
    cancels.start("bob")
    assert cancels.cancel("alice") and not cancels.cancel("carol")
    assert cancels.is_cancelled("alice") and not cancels.is_cancelled("bob")
    cancels.finish("alice")
    assert not cancels.is_cancelled("alice") and not cancels.cancel("alice")


def test_uploads_outlive_their_lifetime_by_a_tenth_of_it_at_most_a_minute(monkeypatch):
    # Gradio deletes files older than the age every period seconds; the period was the
    # TTL itself, so README's "deleted 600 s after" meant anywhere up to 1200 s.
    period, age = ui.build_demo().delete_cache
    assert age == ui.UPLOAD_TTL_S == 600
    assert period == 60


def test_the_history_table_shortens_the_text_and_its_csv_keeps_it_whole(ui_manager):
    text = "A sentence long enough that the history table shows only its start."
    *_, (*_, table, history, csv_path) = ui.run_compare(text, "calm-mid", 0, 8, "cached",
                                                         "cached")
    assert table[0][1] == text[:39] + "…" and history[0][1] == text
    with open(csv_path, encoding="utf-8") as handle:
        assert next(csv.DictReader(handle))["text"] == text
    # A run cancelled after A shows the same rows, shortened as well.
    request = types.SimpleNamespace(session_hash="history")
    steps = ui.run_compare("Cancel me.", "calm-mid", 0, 8, "cached", "cached",
                           history=history, request=request)
    ui.CANCELS.start("history")  # as the page's Run does before the comparison
    next(steps)
    ui.CANCELS.cancel("history")
    *_, (*_, table, kept, _) = steps
    assert table == ui.history_view(history) and kept == history


def test_history_csv_has_a_header_and_a_row_per_run(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(ui, "HISTORY_DIR", tmp_path / "history")
    row = ["12:00:00", "hi", "v", "baseline", "cached", 1, 2.0, 1.0, 2.0, 50.0, "inf", True]
    path = ui.history_csv([row])
    lines = open(path, encoding="utf-8").read().splitlines()
    assert lines[0].split(",") == ui.HISTORY_HEADERS and len(lines) == 2
    # Older than the upload lifetime: deleted when the next one is written.
    stale = time.time() - ui.UPLOAD_TTL_S - 1
    os.utime(Path(path).parent, (stale, stale))
    newer = ui.history_csv([row, row])
    assert not Path(path).exists() and Path(newer).exists()


def test_gpu_work_runs_inside_spaces_gpu_when_the_package_is_there(monkeypatch):
    calls = []

    def fake_gpu(duration):
        def decorate(fn):
            calls.append((fn.__name__, duration))
            return fn
        return decorate

    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=fake_gpu))
    ui.gpu_task(test_history_csv_has_a_header_and_a_row_per_run)
    assert calls == [("test_history_csv_has_a_header_and_a_row_per_run", ui.GPU_SECONDS)]
    monkeypatch.setitem(sys.modules, "spaces", None)  # not installed: unchanged
    assert ui.gpu_task(len) is len


@pytest.mark.parametrize("native", [True, False])
def test_the_presets_table_says_where_bf16_is_only_emulated(ui_manager, monkeypatch, native):
    """bf16 presets read "available" on a CPU without bf16 instructions, where they run
    slower than fp32; the advanced panel's options already said so."""
    monkeypatch.setattr(ui, "CPU_BF16", native)
    rows = {line.split(" | ")[0].strip("| `"): line for line in
            ui.presets_markdown().splitlines()[2:]}
    assert ("emulated" in rows["t3-bf16"]) is not native
    assert ("emulated" in rows["s3gen-bf16"]) is not native
    assert "emulated" not in rows["cached"] and rows["cached"].endswith("| available |")

