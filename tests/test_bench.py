"""The benchmark: like-with-like rows, errors as rows, the documented JSON shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatterbox_demo import bench, hardware

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"preset", "t3_tokens_per_s", "total_s", "s3gen_s", "conditioning_s", "rtf",
            "peak_mem_mb", "speedup", "warmup_s", "t3_s", "watermark_s", "t3_gb_per_s",
            "logits_cosine", "top1_agreement", "mel_snr_db"}


def test_rows_compare_like_with_like_and_a_failure_is_a_row(tiny_manager):
    lines = []
    try:
        result = bench.run(tiny_manager, ["baseline", "gpu-fast", "cpu-fast"],
                           voice="calm-mid", tokens=12, repeats=2, log=lines.append)
    finally:
        tiny_manager.apply_preset("cached")
    # Both rows' variants stay built, so the repeats take turns: drift hits both alike.
    assert [line.split(" (")[0] for line in lines if line.endswith(": repeat")] == \
        ["[bench] baseline", "[bench] cpu-fast"] * 2
    baseline, gpu, fast = result["rows"]
    assert ROW_KEYS <= set(baseline) and ROW_KEYS <= set(fast)
    # The stop token is masked: every row decodes exactly the budget.
    assert baseline["t3_tokens"] == fast["t3_tokens"] == 12
    assert baseline["speedup"] == 1.0
    assert fast["speedup"] == round(baseline["total_s"] / fast["total_s"], 2)
    assert baseline["voice_source"] == "computed" and fast["voice_source"] == "memory"
    assert "unavailable on cpu" in gpu["error"] and "total_s" not in gpu
    assert baseline["mel_snr_db"] == float("inf") and baseline["logits_cosine"] == 1.0
    assert fast["t3_weights_mb"] < baseline["t3_weights_mb"]
    assert result["machine"]["device"] == "cpu" and result["settings"]["tokens"] == 12
    assert result["machine"]["cpu_flags"] == hardware.path_flags()
    markdown = bench.to_markdown(result)
    assert markdown.count("\n| ") == 4  # header and three rows
    assert "| gpu-fast | calm-mid | ValueError: unavailable on cpu" in markdown
    assert markdown.splitlines()[2].startswith("| preset | voice | error | warm-up s |")
    assert "| total s |" in markdown and "first audio" not in markdown  # no --stream here


def test_rows_run_one_after_another_when_their_variants_do_not_fit(tiny_manager,
                                                                   monkeypatch):
    """Taking turns would rebuild (and for compiled ones, recompile) variants between
    repeats, inside the timings: then each row runs whole, warm-up included, in turn."""
    monkeypatch.setattr(tiny_manager, "variants_fit", lambda runs: False)
    lines = []
    try:
        result = bench.run(tiny_manager, ["baseline", "cpu-fast"], voice="calm-mid",
                           tokens=6, repeats=2, with_fidelity=False, log=lines.append)
    finally:
        tiny_manager.apply_preset("cached")
    steps = [line.split(": ", 1)[1] if ": " in line else line for line in lines[1:]
             if "baseline (" in line or "cpu-fast (" in line]
    assert steps == ["warm-up", "repeat", "repeat"] * 2
    assert "one row after another" in lines[0]
    assert all("total_s" in row for row in result["rows"])


def test_each_row_is_warmed_up_by_the_very_generation_it_measures(tiny_manager, monkeypatch):
    """A layer's first call at each new length costs extra once: warmed up at 8 tokens,
    the first row (the speedups' reference) paid it in its first timed run."""
    calls = []
    generate = tiny_manager.generate

    def record(text, voice, params, config=None, **kwargs):
        calls.append((text, voice, params, kwargs.get("ignore_stop")))
        return generate(text, voice, params, config, **kwargs)

    monkeypatch.setattr(tiny_manager, "generate", record)
    try:
        bench.run(tiny_manager, ["cached", "t3-int8"], voice="calm-mid", tokens=10,
                  repeats=1, with_fidelity=False, log=lambda line: None)
    finally:
        tiny_manager.apply_preset("cached")
    # Two rows, each an untimed warm-up and a timed repeat, all the same generation.
    assert len(calls) == 4 and len(set(calls)) == 1
    assert calls[0][2].max_new_tokens == 10 and calls[0][3] is True


def test_no_speedup_against_a_failed_first_row_and_per_voice_references(tiny_manager):
    """The speedups' reference is the first preset, per voice; when it failed, no row has a
    speedup (the next row that ran used to become the reference, unseen). Fidelity is held
    against each voice's own fp32 output: the second voice's baseline agreed with the first
    voice's reference at -0.03 dB."""
    try:
        failed = bench.run(tiny_manager, ["gpu-fast", "cached", "baseline"], voice="calm-mid",
                           tokens=6, with_fidelity=False, log=lambda line: None)
        voices = bench.run(tiny_manager, ["baseline", "cached"], tokens=6,
                           voices=["calm-mid", "narrator-low"], log=lambda line: None)
    finally:
        tiny_manager.apply_preset("cached")
    assert "error" in failed["rows"][0]
    assert all(row.get("speedup") is None for row in failed["rows"])
    for row in voices["rows"]:
        if row["preset"] == "baseline":
            assert row["speedup"] == 1.0, row["voice"]
            assert row["mel_snr_db"] == float("inf") and row["logits_cosine"] == 1.0, row
    # Rows are preset by preset, each for every voice: narrator-low's cached row is the
    # fourth, measured against narrator-low's baseline, the second.
    first, second = voices["rows"][1], voices["rows"][3]
    assert (first["voice"], second["voice"], second["preset"]) == (
        "narrator-low", "narrator-low", "cached")
    assert second["speedup"] == round(first["total_s"] / second["total_s"], 2)


def test_json_is_strict_with_null_for_figures_that_are_not_finite(tmp_path):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    result = {"machine": {"cores": 2}, "settings": {"voices": ("calm-mid",)},
              "rows": [{"preset": "baseline", "mel_snr_db": float("inf"),
                        "odd": [float("nan"), -float("inf"), 1.5]}]}
    bench.write_json(result, tmp_path / "bench.json")
    written = json.loads((tmp_path / "bench.json").read_text(), parse_constant=refuse)
    assert written["rows"] == [{"preset": "baseline", "mel_snr_db": None,
                                "odd": [None, None, 1.5]}]
    assert written["settings"]["voices"] == ["calm-mid"]
    assert result["rows"][0]["mel_snr_db"] == float("inf")  # the result itself unchanged


def test_variants_fit_counts_each_part_against_the_bound(tiny_manager):
    from chatterbox_demo.config import get_preset
    from chatterbox_demo.manager import MAX_VARIANTS

    presets = ["baseline", "cached", "fast-decoder", "s3gen-int8", "cpu-fast"]
    runs = [(get_preset(name), "calm-mid") for name in presets]
    assert tiny_manager.variants_fit(runs)  # T3: fp32, int8; S3Gen: fp32, int8
    copies = ["t3-bf16", "t3-int8", "t3-int8-wo"]  # each a T3 copy of its own
    assert len(copies) == MAX_VARIANTS
    # The pristine fp32 T3 (baseline's) is the loaded model, not a copy: it is not counted.
    assert tiny_manager.variants_fit([(get_preset(name), None)
                                      for name in [*copies, "baseline"]])
    assert not tiny_manager.variants_fit([(get_preset(name), None)
                                          for name in [*copies, "t3-onednn"]])


@pytest.mark.parametrize("to_file", [True, False])
def test_cli_bench_writes_json_markdown_and_plot(tmp_path, session_cache, to_file):
    md, png, out = tmp_path / "bench.md", tmp_path / "bench.png", tmp_path / "bench.json"
    json_args = ["--json", str(out)] if to_file else ["--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "chatterbox_demo", "bench", "--weights", "tiny",
         "--presets", "cached,cpu-turbo,cached+t3_decoder=fast", "--tokens", "40",
         "--no-fidelity", "--stream",
         *json_args,
         "--markdown", str(md), "--plot", str(png)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "CHATTERBOX_DEMO_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    if to_file:
        assert "| cached |" in proc.stdout  # the markdown table, printed
    result = json.loads(out.read_text() if to_file else proc.stdout)
    assert [r["preset"] for r in result["rows"]] == ["cached", "cpu-turbo",
                                                      "cached+t3_decoder=fast"]
    assert [r["t3_decoder"] for r in result["rows"]] == ["stock", "fast", "fast"]
    assert {"machine", "rows"} <= set(result)
    assert "cpu-turbo" in md.read_text() and "first audio s" in md.read_text()
    assert "medians; the streamed columns from one run after an untimed one" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in result["rows"]:  # the streamed run of the same generation
        assert 0 < row["first_audio_s"] < row["stream_total_s"]
        assert row["first_audio_share"] == round(row["first_audio_s"] / row["total_s"], 3)


@pytest.mark.parametrize("presets, error", [
    ("baseline,warp-speed", "Unknown preset 'warp-speed'"),
    ("baseline,cached+cfm_steps=eight", "cfm_steps must be a whole number (got 'eight')"),
])
def test_cli_bench_refuses_an_unknown_preset_before_measuring(presets, error):
    proc = subprocess.run([sys.executable, "-m", "chatterbox_demo", "bench", "--weights",
                           "tiny", "--presets", presets],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {error}")


def test_trim_prompt_keeps_the_first_seconds_and_never_aliases():
    import torch

    from chatterbox_demo.pipeline import trim_prompt

    gen = {"prompt_token": torch.arange(250).view(1, -1), "prompt_token_len": torch.tensor([250]),
           "prompt_feat": torch.zeros(1, 500, 80), "prompt_feat_len": None,
           "embedding": torch.ones(1, 192)}
    trimmed = trim_prompt(gen, 3.0)
    assert trimmed["prompt_token"].shape == (1, 75) and trimmed["prompt_token_len"].item() == 75
    assert trimmed["prompt_feat"].shape == (1, 150, 80)
    assert gen["prompt_token"].shape == (1, 250)  # the cached dict is untouched
    full = trim_prompt(gen, None)
    assert full is not gen and full["prompt_token"] is gen["prompt_token"]
    # A frame beyond twice the tokens stays: S3Gen's output starts where the frames end.
    gen["prompt_feat"] = torch.zeros(1, 501, 80)
    assert trim_prompt(gen, 3.0)["prompt_feat"].shape == (1, 151, 80)


def test_a_prompt_cut_to_its_whole_length_renders_the_same_mel(tiny_manager):
    """It rendered one frame more at the start, so the sweep's prompt rows and any
    +prompt_seconds preset had their mel SNR taken between neighbouring frames (-0.6 dB
    where the frames agree, on a voice with that odd frame)."""
    import torch
    from chatterbox.models.s3tokenizer import SPEECH_VOCAB_SIZE

    from chatterbox_demo import fidelity

    library = tiny_manager.library
    odd = [name for name in library.names()
           if (gen := library.conditionals(library.get(name))[0].gen)["prompt_feat"].shape[1]
           == 2 * gen["prompt_token"].shape[1] + 1]
    assert odd, "no shipped voice has the odd frame this test is about"
    conds, _ = library.conditionals(library.get(odd[0]))
    s3gen = tiny_manager.loaded.tts.s3gen
    tokens = torch.randint(0, SPEECH_VOCAB_SIZE, (30,), generator=torch.Generator().manual_seed(0))
    whole = fidelity.mel(s3gen, conds, tokens, 2, True)
    every_token = conds.gen["prompt_token"].shape[1] / 25
    assert fidelity.snr_db(whole, fidelity.mel(s3gen, conds, tokens, 2, True,
                                               prompt_seconds=every_token)) == float("inf")
    assert fidelity.mel(s3gen, conds, tokens, 2, True, prompt_seconds=3.0).shape == whole.shape


def test_sweep_points_change_the_output_and_are_measured(tiny_manager):
    from chatterbox_demo.config import SWEEP

    assert not SWEEP["cfm-10-steps"].changes_output
    assert all(c.changes_output for n, c in SWEEP.items() if n != "cfm-10-steps")
    try:
        result = bench.run(tiny_manager, ["cfm-10-steps", "cfm-4-steps", "prompt-3s"],
                           voice="calm-mid", tokens=10, configs=SWEEP, log=lambda line: None)
    finally:
        tiny_manager.apply_preset("cached")
    rows = {r["preset"]: r for r in result["rows"]}
    assert all("error" not in r for r in rows.values()), rows
    # Same model, upstream settings: as close to fp32 as cpu-fast is; the knobs move further.
    assert rows["cfm-4-steps"]["mel_snr_db"] < rows["cfm-10-steps"]["mel_snr_db"]
    assert rows["prompt-3s"]["mel_snr_db"] < rows["cfm-10-steps"]["mel_snr_db"]


def test_bench_records_the_flags_that_pick_paths():
    """One model name covers unlike CPUs ("AMD EPYC": Zen 3 with AVX2 alone, Zen 4 with
    AVX-512, VNNI and bf16), so a recorded run names the flags that chose its paths."""
    zen4 = {"fpu", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "sha_ni"}
    assert hardware.path_flags(zen4) == ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]
    result = {"machine": {"cpu": "AMD EPYC", "cpu_flags": hardware.path_flags(zen4),
                          "cores": 2, "torch": "2.6.0", "device": "cpu", "weights": "random"},
              "settings": {"tokens": 100, "repeats": 1}, "rows": []}
    header = bench.to_markdown(result).splitlines()[0]
    assert header.startswith("AMD EPYC (avx2, avx512f, avx512_bf16, avx512_vnni), 2 cores")
    del result["machine"]["cpu_flags"]  # runs recorded before the field
    assert bench.to_markdown(result).startswith("AMD EPYC, 2 cores")


def test_an_error_row_stays_one_row_of_the_table():
    result = {"machine": {"cpu": "CPU", "cores": 2, "torch": "2.6.0", "device": "cpu",
                          "weights": "tiny"},
              "settings": {"tokens": 8, "repeats": 1},
              "rows": [{"preset": "a|b", "voice": "calm-mid",
                        "error": "RuntimeError: shapes [2|3]\nand more"}]}
    header, _, row = bench.to_markdown(result).splitlines()[-3:]
    assert row == r"| a\|b | calm-mid | RuntimeError: shapes [2\|3] and more |"
    # A cell the header lacks is dropped (GitHub's tables): with every row failed, the
    # header kept only preset and voice, and the errors were not shown.
    assert header == "| preset | voice | error |"


def test_bench_records_the_cpu_family_and_model(tmp_path):
    """Zen 4 and Zen 5 EPYCs share a name and most flags; family and model tell them
    apart. Only the first processor's lines count (Linux repeats them per core)."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n"
                       "model\t\t: 2\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\n"
                       "cpu family\t: 25\nmodel\t\t: 17\n")
    assert bench._cpu_family_model(cpuinfo) == "family 26, model 2"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # Arm names neither
    assert bench._cpu_family_model(cpuinfo) is None
    assert bench._cpu_family_model(tmp_path / "missing") is None


def fake_result(rows: list[dict]) -> dict:
    return {"machine": {"cpu": "CPU", "cores": 2, "torch": "2.6.0", "device": "cpu",
                        "weights": "tiny"},
            "settings": {"tokens": 8, "repeats": 1}, "rows": rows}


@pytest.mark.parametrize("runs, labels", [
    ([("baseline", "calm"), ("baseline", "low"), ("cached", "calm"), ("cached", "low")],
     ["baseline\n(calm)", "baseline\n(low)", "cached\n(calm)", "cached\n(low)"]),
    ([("cached", "calm"), ("cached", "calm"), ("cached+cfm_steps=4", "calm")],
     ["cached #1", "cached #2", "cached\n+cfm_steps=4"]),
])
def test_every_row_has_a_bar_of_its_own(monkeypatch, tmp_path, runs, labels):
    """matplotlib draws the rows that share a label as one bar: with --voices A,B each
    preset's rows were stacked over each other, and --presets cached,cached drew one."""
    figures = []
    monkeypatch.setattr(bench, "_save", lambda fig, path: figures.append(fig))
    rows = [{"preset": preset, "voice": voice, "t3_s": 1.0, "total_s": 1.0}
            for preset, voice in runs]
    bench.plot(fake_result(rows), tmp_path / "bench.png")
    axes = figures[0].axes[0]
    assert len({bar.get_x() for bar in axes.patches}) == len(rows)
    assert [label.get_text() for label in axes.get_xticklabels()] == labels


def test_the_sweep_chart_names_each_voice_and_a_repeat():
    rows = [{"preset": "cfm-4-steps", "voice": "calm"}, {"preset": "cfm-4-steps", "voice": "low"},
            {"preset": "prompt-3s", "voice": "calm"}, {"preset": "prompt-3s", "voice": "calm"}]
    assert bench.row_labels(rows) == ["cfm-4-steps (calm)", "cfm-4-steps (low)",
                                      "prompt-3s (calm) #1", "prompt-3s (calm) #2"]


def test_the_streamed_figures_come_after_an_untimed_streamed_run(tiny_manager, monkeypatch):
    """The one streamed run was the first at S3Gen's block lengths and paid their first
    calls' cost (17% of its total on the tiny model), beside warm one-shot medians."""
    from chatterbox_demo.bench import Measurement
    from chatterbox_demo.config import GenerationParams, get_preset

    streams = []
    real = tiny_manager.stream
    monkeypatch.setattr(tiny_manager, "stream",
                        lambda *args, **kwargs: streams.append(args) or real(*args, **kwargs))
    measured = Measurement(tiny_manager, get_preset("cached"), "Stream me.", "calm-mid",
                           GenerationParams(max_new_tokens=20), ignore_stop=True)
    measured.repeat()
    row = measured.row(stream=True)
    assert len(streams) == 2 and streams[0] == streams[1]
    assert 0 < row["first_audio_s"] < row["stream_total_s"]


def test_each_row_names_its_thread_count_and_the_machine_the_default(tiny_manager):
    """The machine's "threads" was read after the last row, so it named whatever that
    row's cpu_threads had set."""
    from chatterbox_demo import bench
    from chatterbox_demo.config import config_from_spec
    from chatterbox_demo.optimizations import DEFAULT_THREADS

    one = "cached+cpu_threads=1"
    result = bench.run(tiny_manager, ["cached", one], tokens=10, with_fidelity=False,
                       configs={one: config_from_spec(one)})
    assert [row["threads"] for row in result["rows"]] == [DEFAULT_THREADS, 1]
    assert result["machine"]["threads"] == DEFAULT_THREADS
