"""What README.md promises, checked: its commands parse, its settings exist."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from chatterbox_demo import weights
from chatterbox_demo.cli import build_parser
from chatterbox_demo.config import MAX_LONG_TEXT_CHARS, MAX_TEXT_CHARS, PRESETS
from chatterbox_demo.manager import DEVICES

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CLI_LINES = [line.strip() for line in README.splitlines()
             if line.strip().startswith("python -m chatterbox_demo")]


def test_readme_shows_the_cli():
    assert len(CLI_LINES) >= 5


@pytest.mark.parametrize("line", CLI_LINES)
def test_every_cli_example_parses(line):
    argv = shlex.split(line)[3:]
    build_parser().parse_args(argv)  # exits (SystemExit) on an unknown flag or subcommand


def subcommands(parser: argparse.ArgumentParser, words: tuple = ()):
    """(words, parser) of every subcommand that runs: ("voices", "add"), ("synth",)..."""
    chosen = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not chosen:
        yield words, parser
        return
    for name, sub in chosen[0].choices.items():
        yield from subcommands(sub, (*words, name))


def test_the_subcommands_without_weights_device_and_json_are_the_ones_named():
    claim = " ".join(README.split("## Command line", 1)[1].split("```", 1)[0].split())
    named = set(re.findall(r"but `([^`]+)`", claim))
    flags = ("--weights", "--device", "--json")
    lacking = {" ".join(words) for words, sub in subcommands(build_parser())
               if not all(flag in sub._option_string_actions for flag in flags)}
    assert named == lacking


def test_every_weights_value_in_the_table_is_accepted():
    section = README.split("## Weights", 1)[1].split("\n## ", 1)[0]
    values = re.findall(r"^\| `([^`]+)`", section, flags=re.MULTILINE)
    assert {"auto", "hub", "local:DIR", "random", "tiny"} <= set(values)
    for value in values:
        weights.parse_source(value)


def test_devices_named_in_readme_exist():
    for device in ("auto", "cuda", "mps", "cpu"):
        assert f"`{device}`" in README and device in DEVICES


def test_make_targets_and_ci_use_the_readme_commands():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.MULTILINE)
    assert re.search(r"^test:", makefile, re.MULTILINE)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make demo" in README and "make test" in README


def test_spaces_front_matter_matches_the_pinned_gradio():
    front = README.split("---")[1]
    pinned = re.search(r"^gradio==(\S+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    assert f"sdk_version: {pinned.group(1)}" in front
    assert "app_file: app.py" in front and "sdk: gradio" in front
    for key in ("title:", "emoji:", "python_version:", "license:"):
        assert key in front


def test_readme_lists_every_preset():
    from chatterbox_demo.config import PRESETS

    for name in PRESETS:
        assert f"`{name}`" in README, name


def test_readme_api_examples_match_the_api():
    from chatterbox_demo import api

    assert '"model": "chatterbox"' in README and 'base_url="http://127.0.0.1:7860/v1"' in README
    for fmt in api.FORMATS:
        assert f"`{fmt}`" in README
    for model in api.MODELS:
        assert f"`{model}`" in README
    assert "CHATTERBOX_API_KEY" in README
    text = " ".join(README.split())
    assert ("`max_new_tokens`, and `preset` (a preset name" in text
            and "Without `preset` a request runs the preset the server started on" in text)


def test_the_gpu_check_carries_the_versions_this_environment_runs():
    """docs/experiments/gpu_wheels.sh pins what requirements.txt installs here, so the GPU
    machine runs the same packages the tests ran; a requirements bump must move it too.

    Exactly for what requirements.txt or chatterbox-tts pin with ``==``: those are this
    environment's fixed versions. The small packages below them (decorator, pooch, ...) are
    whatever pip resolved on the day, and a fresh install moves with their releases (CI
    failed when decorator 5.3.2 came out), so for them it is enough that they are installed
    here too."""
    from importlib.metadata import requires, version

    script = (ROOT / "docs" / "experiments" / "gpu_wheels.sh").read_text()
    pins = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s)]*)", script))
    assert {"chatterbox-tts", "transformers", "diffusers", "librosa"} <= set(pins)
    declared = (ROOT / "requirements.txt").read_text().splitlines() + requires("chatterbox-tts")
    fixed = {m.group(1) for line in declared
             if (m := re.match(r"([A-Za-z0-9_.-]+)==[0-9.]+\s*(;|$)", line))}
    assert {"chatterbox-tts", "transformers", "diffusers", "librosa"} <= fixed
    assert {name: version(name) for name in pins if name in fixed} == {
        name: pin for name, pin in pins.items() if name in fixed}
    for name in pins:
        version(name)  # installed here: else the set no longer matches what chatterbox needs
    # And the check's benchmark commands parse, with presets that exist, between them
    # gpu-fast and gpu-compiled, each beside baseline.
    check = (ROOT / "docs" / "experiments" / "gpu_check.sh").read_text().replace("\\\n", " ")
    commands = re.findall(r"python3 -m chatterbox_demo (bench [^>]+)>", check)
    benched = set()
    for command in commands:
        args = build_parser().parse_args(shlex.split(command))
        presets = args.presets.split(",")
        assert args.device == "cuda" and presets[0] == "baseline", command
        assert set(presets) <= set(PRESETS), command
        benched |= set(presets)
    assert {"gpu-fast", "gpu-compiled"} <= benched


EPYC = '"cpu": "AMD EPYC"'  # the machine's cpu field, exactly
# The Zen 4 and Zen 5 EPYCs: the same cpu field, told apart by their flags (the Zen 5's
# are the Zen 4's and AVX-VNNI, so the Zen 4's list is matched whole).
ZEN4 = '"cpu_flags": ["avx2", "avx512f", "avx512_bf16", "avx512_vnni"]'
ZEN5 = '"avx_vnni"'
ZEN5_RUNS = ("bench-cpu-zen5.json", "bench-cpu-zen5-second.json")
# The Zen 4's four runs, in run order.
ZEN4_RUNS = ("bench-cpu-zen4.json", "bench-cpu-zen4-compiled.json", "bench-cpu-zen4-int8.json",
             "bench-cpu-zen4-rows.json")


def recorded_rows(name: str, machine: str) -> dict:
    """A recorded bench run's rows by preset (docs/NAME), after checking that the run's
    machine description contains ``machine``."""
    import json

    recorded = json.loads((ROOT / "docs" / name).read_text())
    assert machine in json.dumps(recorded["machine"])
    return {row["preset"]: row for row in recorded["rows"]}


def decode_speedup(rows: dict) -> str:
    """How the docs quote cpu-fast's T3 tokens/s against baseline's in one run."""
    fast, base = rows["cpu-fast"]["t3_tokens_per_s"], rows["baseline"]["t3_tokens_per_s"]
    return f"{fast / base:.1f}x"


def decodes_as_quoted(rows: dict) -> str:
    """How README opens a run's decode figures: cpu-fast's speed-up over baseline and both
    rates."""
    fast, base = rows["cpu-fast"]["t3_tokens_per_s"], rows["baseline"]["t3_tokens_per_s"]
    return (f"`cpu-fast` decodes {decode_speedup(rows)} as fast as `baseline` ({fast:.1f} "
            f"speech tokens a second against {base:.1f}")


def s3gen_speedup(rows: dict, preset: str) -> str:
    """How the docs quote a preset's S3Gen against baseline's in one run."""
    return f"{rows['baseline']['s3gen_s'] / rows[preset]['s3gen_s']:.2f}x"


def test_the_gpu_figures_quoted_are_the_recorded_runs():
    """README's H100 sentence quotes docs/bench-gpu-h100.json (gpu-fast) and
    docs/bench-gpu-h100-compiled.json (gpu-compiled); a new run must move both."""
    rows = recorded_rows("bench-gpu-h100.json", "H100")
    fast, base = rows["gpu-fast"], rows["baseline"]
    compiled = recorded_rows("bench-gpu-h100-compiled.json", "H100")["gpu-compiled"]
    sentence = " ".join(README.split("On an H100, ")[1].split(".\n")[0].split())
    assert f"`gpu-fast` runs {fast['speedup']:.1f}x `baseline`" in sentence
    assert f"RTF {fast['rtf']:.2f} for {fast['audio_seconds']:.1f} s of speech" in sentence
    assert f"{fast['t3_tokens_per_s']:.0f} speech tokens a second against " \
           f"{base['t3_tokens_per_s']:.0f}" in sentence
    assert f"`gpu-compiled` runs {compiled['speedup']:.1f}x `baseline` " \
           f"(RTF {compiled['rtf']:.2f}), decoding {compiled['t3_tokens_per_s']:.0f} a " \
           f"second, after {compiled['warmup_s']:.0f} s of compiling" in sentence


def test_the_h200_figures_quoted_are_the_recorded_run():
    """README's H200 sentence quotes docs/bench-gpu-h200.json (run 4)."""
    rows = recorded_rows("bench-gpu-h200.json", "H200")
    compiled, base = rows["gpu-compiled"], rows["baseline"]
    sentence = " ".join(README.split("On an H200, ")[1].split(".\n")[0].split())
    assert f"`gpu-compiled` runs {compiled['speedup']:.1f}x `baseline` " \
           f"(RTF {compiled['rtf']:.2f} for {compiled['audio_seconds']:.1f} s of speech), " \
           f"decoding {compiled['t3_tokens_per_s']:.0f} speech tokens a second against " \
           f"{base['t3_tokens_per_s']:.0f}, after {compiled['warmup_s']:.0f} s of " \
           "compiling" in sentence


def test_the_cpu_compiled_figures_quoted_are_the_recorded_run():
    """README quotes docs/bench-cpu-static.json for cpu-compiled; a new run must move it."""
    rows = recorded_rows("bench-cpu-static.json", "Xeon")
    compiled = rows["cpu-compiled"]
    text = " ".join(README.split())
    sentence = text.split("Without bf16 instructions, ")[1].split(" On an H100")[0]
    assert f"`cpu-compiled` runs {compiled['speedup']:.2f}x `baseline`" in sentence
    assert f"S3Gen {compiled['s3gen_speedup']:.2f}x" in sentence
    warmup = rows["s3gen-int8-static"]["warmup_s"]  # the row that built its S3Gen variant
    assert f"after {warmup:.0f} s of compiling" in sentence


def test_the_avx2_figures_quoted_are_the_recorded_runs():
    """README's AMD EPYC sentences quote docs/bench-cpu-avx2-onednn-turns.json (cpu-fast
    and t3-onednn now), docs/bench-cpu-avx2-onednn-compiled.json (the later run),
    docs/bench-cpu-avx2-cpu-fast-turns.json (the third), docs/bench-cpu-avx2-voice-prefix.json
    (the fourth), docs/bench-cpu-avx2-aoti.json (the fifth),
    docs/bench-cpu-avx2-parallel-rows.json (the sixth) and docs/bench-cpu-avx2-static.json
    (before the oneDNN change)."""
    now = recorded_rows("bench-cpu-avx2-onednn-turns.json", EPYC)
    before = recorded_rows("bench-cpu-avx2-static.json", EPYC)
    text = " ".join(README.split())
    sentence = text.split("On a 2-core AMD EPYC with AVX2 only")[1].split(" On an H100")[0]
    assert (f"{decodes_as_quoted(now)}) and runs {now['cpu-fast']['speedup']:.2f}x end to end"
            ) in sentence
    onednn = now["t3-onednn"]["t3_tokens_per_s"] / now["baseline"]["t3_tokens_per_s"]
    assert now["t3-onednn"]["logits_cosine"] == 1.0
    assert f"it decodes {onednn:.1f}x as fast as `baseline` with fp32's output" in sentence
    assert (f"`cpu-fast` ran {before['cpu-fast']['speedup']:.2f}x and `cpu-compiled` "
            f"{before['cpu-compiled']['speedup']:.2f}x") in sentence
    later = recorded_rows("bench-cpu-avx2-onednn-compiled.json", EPYC)
    third = recorded_rows("bench-cpu-avx2-cpu-fast-turns.json", EPYC)
    assert (f"({later['cpu-fast']['speedup']:.2f}x in a later run, where `cpu-compiled` ran "
            f"{later['cpu-compiled']['speedup']:.2f}x after "
            f"{later['cpu-compiled']['warmup_s']:.0f} s of compiling, and "
            f"{third['cpu-fast']['speedup']:.2f}x in a third)") in sentence
    fourth = recorded_rows("bench-cpu-avx2-voice-prefix.json", EPYC)
    assert (f"measured {fourth['cpu-fast']['speedup']:.2f}x on a day the machine ran slow"
            ) in sentence and f"(`baseline` took {fourth['baseline']['total_s']:.1f} s" in sentence
    fifth = recorded_rows("bench-cpu-avx2-aoti.json", EPYC)
    assert (f"a fifth, as slow, {fifth['cpu-fast']['speedup']:.2f}x (`baseline` "
            f"{fifth['baseline']['total_s']:.1f} s; `cpu-compiled` "
            f"{fifth['cpu-compiled']['speedup']:.2f}x)") in sentence
    sixth = recorded_rows("bench-cpu-avx2-parallel-rows.json", EPYC)
    assert (f"measured {sixth['cpu-fast']['speedup']:.2f}x (`baseline` "
            f"{sixth['baseline']['total_s']:.1f} s), its S3Gen "
            f"{sixth['cpu-fast']['s3gen_speedup']:.2f}x `baseline`'s") in sentence
    # 7-bit activations (the fifth run) against 8-bit ones (the runs before).
    assert (f"agrees with fp32 at {fifth['cpu-compiled']['mel_snr_db']:.1f} dB, against "
            f"{later['cpu-compiled']['mel_snr_db']:.1f} dB with 8 bits") in sentence


def test_the_amx_figures_quoted_are_the_recorded_run():
    """README's opening figure for a CPU with AMX quotes docs/bench-cpu-amx-rows.json."""
    amx = recorded_rows("bench-cpu-amx-rows.json", "amx_bf16")["cpu-fast"]
    text = " ".join(README.split())
    assert (f"`cpu-fast` runs {amx['speedup']:.2f}x `baseline` end to end where the CPU has "
            f"bf16 matrix instructions (AMX; S3Gen {amx['s3gen_speedup']:.2f}x)") in text


def test_the_amx_compile_modes_table_is_the_recorded_run():
    """docs/benchmarks.md's table of compile modes on the Xeon with AMX quotes its run."""
    rows = recorded_rows("bench-cpu-amx-compile-modes.json", "amx_bf16")
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    for preset, label in (("cached", "cached"), ("compiled", "compiled"),
                          ("compiled+compile_mode=max-autotune-no-cudagraphs",
                           "compiled, `max-autotune-no-cudagraphs`")):
        row = rows[preset]
        assert (f"| {label} | {row['warmup_s']:.1f} | {row['t3_tokens_per_s']:.2f} | "
                f"{row['s3gen_s']:.2f} | {row['total_s']:.2f} |") in benchmarks, preset
        assert f" | {row['speedup']} |" in benchmarks


def test_the_zen4_figures_quoted_are_the_recorded_runs():
    """README's Zen 4 sentence quotes docs/bench-cpu-zen4-rows.json (cpu-fast as it is
    now on that CPU), the three runs before it, and cpu-compiled from the third, which
    loaded what the second compiled."""
    first, compiled, int8, now = (recorded_rows(name, ZEN4) for name in ZEN4_RUNS)
    text = " ".join(README.split())
    sentence = text.split("with AVX-512, VNNI and AVX512-BF16 (Zen 4), ")[1].split(" On an H100")[0]
    assert f"{decodes_as_quoted(now)};" in sentence
    assert (f"runs {now['cpu-fast']['speedup']:.2f}x end to end, its S3Gen "
            f"{s3gen_speedup(now, 'cpu-fast')} `baseline`'s with upstream semantics") in sentence
    assert (f"({int8['cpu-fast']['speedup']:.2f}x, {first['cpu-fast']['speedup']:.2f}x and "
            f"{compiled['cpu-fast']['speedup']:.2f}x in three runs before)") in sentence
    assert (f"`cpu-compiled` runs {int8['cpu-compiled']['speedup']:.2f}x, its S3Gen "
            f"{s3gen_speedup(int8, 'cpu-compiled')} `baseline`'s, loading the estimator an "
            f"earlier run compiled in {compiled['cpu-compiled']['warmup_s']:.0f} s") in sentence


def test_the_zen5_figures_quoted_are_the_recorded_runs():
    """README's Zen 5 sentence quotes docs/bench-cpu-zen5.json and its second run."""
    rows, second = (recorded_rows(name, ZEN5) for name in ZEN5_RUNS)
    text = " ".join(README.split())
    sentence = text.split("(Zen 5, AVX-VNNI besides), ")[1].split(" On an H100")[0]
    assert (f"{decodes_as_quoted(rows)}) and runs {rows['cpu-fast']['speedup']:.2f}x end to "
            f"end, its S3Gen {s3gen_speedup(rows, 'cpu-fast')} `baseline`'s with upstream "
            f"semantics ({second['cpu-fast']['speedup']:.2f}x and "
            f"{s3gen_speedup(second, 'cpu-fast')} in a second run)") in sentence
    assert (f"(`cpu-compiled` ran {rows['cpu-compiled']['speedup']:.2f}x there, after "
            f"{rows['cpu-compiled']['warmup_s']:.0f} s of compiling)") in sentence


def test_the_kept_compile_figures_quoted_are_the_recorded_runs():
    """README's first and second warm-up of cpu-compiled are the two runs that share one
    cache directory: the first compiled the estimator, the second loaded its package."""
    first, second = (recorded_rows(f"bench-cpu-avx2-aoti-keyed-{run}.json", EPYC)
                     ["cpu-compiled"]["warmup_s"] for run in ("first", "second"))
    text = " ".join(README.split())
    assert (f"`cpu-compiled` warmed up in {first:.0f} s the first time and in {second:.0f} s "
            "in a second process") in text


def test_the_targets_table_is_the_recorded_runs():
    """docs/benchmarks.md's table of issue 3's targets quotes rows of the recorded runs."""
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    table = benchmarks.split("## Issue 3's targets at a glance")[1].split("\n## ")[0]
    for name in re.findall(r"`(bench-[\w-]+\.json)`", table):
        assert (ROOT / "docs" / name).exists(), name

    epyc = recorded_rows("bench-cpu-avx2-onednn-turns.json", EPYC)
    compiled = recorded_rows("bench-cpu-avx2-onednn-compiled.json", EPYC)
    third = recorded_rows("bench-cpu-avx2-cpu-fast-turns.json", EPYC)
    fourth = recorded_rows("bench-cpu-avx2-voice-prefix.json", EPYC)
    fifth = recorded_rows("bench-cpu-avx2-aoti.json", EPYC)
    sixth = recorded_rows("bench-cpu-avx2-parallel-rows.json", EPYC)
    zen4, zen4_compiled, zen4_int8, zen4_rows = (recorded_rows(name, ZEN4) for name in ZEN4_RUNS)
    zen5, zen5_second = (recorded_rows(name, ZEN5) for name in ZEN5_RUNS)
    amx_first = recorded_rows("bench-cpu.json", "Xeon")
    amx = recorded_rows("bench-cpu-amx-rows.json", "amx_bf16")
    noamx = recorded_rows("bench-cpu-noamx-r3.json", "Xeon")
    h100 = recorded_rows("bench-gpu-h100.json", "H100")["gpu-fast"]
    h100_compiled = recorded_rows("bench-gpu-h100-compiled.json", "H100")["gpu-compiled"]
    h200_compiled = recorded_rows("bench-gpu-h200.json", "H200")["gpu-compiled"]

    expected = [
        f"{decode_speedup(epyc)} on the AVX2 EPYC "
        f"({epyc['cpu-fast']['t3_tokens_per_s']:.1f} against "
        f"{epyc['baseline']['t3_tokens_per_s']:.1f} tokens/s)",
        f"{decode_speedup(zen4_int8)} on the Zen 4 EPYC "
        f"({zen4_int8['cpu-fast']['t3_tokens_per_s']:.1f} "
        f"against {zen4_int8['baseline']['t3_tokens_per_s']:.1f})",
        f"| {zen4_int8['cpu-fast']['t3_tokens_per_s']:.1f} tokens/s on the Zen 4 EPYC (`cpu-fast`; "
        f"{zen4['cpu-fast']['t3_tokens_per_s']:.1f}, "
        f"{zen4_compiled['cpu-fast']['t3_tokens_per_s']:.1f} and "
        f"{zen4_rows['cpu-fast']['t3_tokens_per_s']:.1f} in three more runs)",
        f"{s3gen_speedup(zen4_rows, 'cpu-fast')} on the Zen 4 EPYC (`cpu-fast` since its CFM "
        f"rows run side by side, int8 dynamic estimator, "
        f"{zen4_rows['cpu-fast']['mel_snr_db']:.1f} dB mel SNR;",
        f"before the rows, {s3gen_speedup(zen4_int8, 'cpu-fast')}), and "
        f"{s3gen_speedup(zen4_compiled, 'cpu-compiled')} and "
        f"{s3gen_speedup(zen4_int8, 'cpu-compiled')} there by `cpu-compiled` (int8 on VNNI, "
        f"{zen4_compiled['cpu-compiled']['mel_snr_db']:.1f} dB mel SNR;",
        f"per frame); {s3gen_speedup(zen5, 'cpu-fast')} and",
        f"Zen 4 EPYC: {zen4['cpu-fast']['speedup']:.2f}x, "
        f"{zen4_compiled['cpu-fast']['speedup']:.2f}x, "
        f"{zen4_int8['cpu-fast']['speedup']:.2f}x and "
        f"{zen4_rows['cpu-fast']['speedup']:.2f}x in four runs, `cpu-compiled` "
        f"{zen4_compiled['cpu-compiled']['speedup']:.2f}x and "
        f"{zen4_int8['cpu-compiled']['speedup']:.2f}x;",
        f"{decode_speedup(zen5)} on the Zen 5 EPYC "
        f"({zen5['cpu-fast']['t3_tokens_per_s']:.1f} against "
        f"{zen5['baseline']['t3_tokens_per_s']:.1f}; {decode_speedup(zen5_second)} in a "
        "second run)",
        f"in three more runs); {zen5['cpu-fast']['t3_tokens_per_s']:.1f} tokens/s on the "
        "Zen 5 EPYC "
        f"({zen5_second['cpu-fast']['t3_tokens_per_s']:.1f} in a second run);",
        f"{s3gen_speedup(zen5, 'cpu-fast')} and {s3gen_speedup(zen5_second, 'cpu-fast')} on "
        "the Zen 5 EPYC "
        f"(`cpu-fast`, int8 dynamic estimator, {zen5['cpu-fast']['mel_snr_db']:.1f} dB mel SNR;",
        f"`cpu-compiled` {s3gen_speedup(zen5, 'cpu-compiled')} and "
        f"{s3gen_speedup(zen5_second, 'cpu-compiled')}); 1.33x on the AVX2 EPYC",
        f"Zen 5 EPYC: {zen5['cpu-fast']['speedup']:.2f}x and "
        f"{zen5_second['cpu-fast']['speedup']:.2f}x in two runs, `cpu-compiled` "
        f"{zen5['cpu-compiled']['speedup']:.2f}x and "
        f"{zen5_second['cpu-compiled']['speedup']:.2f}x; Zen 4 EPYC:",
        f"{decode_speedup(noamx)} on the Xeon without bf16 "
        f"({noamx['cpu-fast']['t3_tokens_per_s']:.1f} "
        f"against {noamx['baseline']['t3_tokens_per_s']:.1f})",
        f"runs {noamx['baseline']['t3_tokens_per_s'] / epyc['baseline']['t3_tokens_per_s']:.1f}x "
        "the EPYC's",
        f"; {epyc['cpu-fast']['t3_tokens_per_s']:.1f} tokens/s (`cpu-fast`, EPYC) on the AVX2 one",
        f"{s3gen_speedup(amx, 'cpu-fast')} on the Xeon with AMX (`cpu-fast` since its CFM rows "
        f"run side by side, bf16 estimator, {amx['cpu-fast']['mel_snr_db']:.1f} dB mel SNR; "
        f"{s3gen_speedup(amx_first, 'cpu-fast')} before)",
        f"and {decode_speedup(amx)} on the Xeon with AMX "
        f"({amx['cpu-fast']['t3_tokens_per_s']:.1f} against "
        f"{amx['baseline']['t3_tokens_per_s']:.1f})",
        f"{s3gen_speedup(compiled, 'cpu-compiled')} on the AVX2 EPYC (`cpu-compiled`; `cpu-fast` "
        f"{s3gen_speedup(epyc, 'cpu-fast')}, and {s3gen_speedup(sixth, 'cpu-fast')} since its "
        "CFM rows run side by side)",
        f"EPYC: {epyc['cpu-fast']['speedup']:.2f}x, {compiled['cpu-fast']['speedup']:.2f}x and "
        f"{third['cpu-fast']['speedup']:.2f}x in three runs, `cpu-compiled` "
        f"{compiled['cpu-compiled']['speedup']:.2f}x; {fourth['cpu-fast']['speedup']:.2f}x in a "
        "fourth run with the voice's prefix kept, on a day the machine ran slow (`baseline` "
        f"{fourth['baseline']['total_s']:.1f} s), and {fifth['cpu-fast']['speedup']:.2f}x in a "
        f"fifth, as slow (`baseline` {fifth['baseline']['total_s']:.1f} s; `cpu-compiled` "
        f"{fifth['cpu-compiled']['speedup']:.2f}x), and {sixth['cpu-fast']['speedup']:.2f}x "
        "in a sixth with the CFM rows side by side, as slow (`baseline` "
        f"{sixth['baseline']['total_s']:.1f} s); Xeon with AMX "
        f"{amx['cpu-fast']['speedup']:.2f}x ({amx_first['cpu-fast']['speedup']:.2f}x before "
        f"the rows, oneDNN and the voice prefix), without {noamx['cpu-fast']['speedup']:.2f}x",
        f"{epyc['cpu-fast']['t3_weights_mb']:.0f} MB against "
        f"{epyc['baseline']['t3_weights_mb']:.0f} MB "
        f"({1 - epyc['cpu-fast']['t3_weights_mb'] / epyc['baseline']['t3_weights_mb']:.0%} less)",
        f"`gpu-fast` {h100['t3_tokens_per_s']:.0f} tokens/s; `gpu-compiled` "
        f"{h100_compiled['t3_tokens_per_s']:.0f} (H100) and "
        f"{h200_compiled['t3_tokens_per_s']:.0f} (H200)",
        f"{h100_compiled['rtf']:.3f} (H100) and {h200_compiled['rtf']:.3f} (H200)",
    ]
    for figure in expected:
        assert figure in table, figure


def test_the_text_limits_quoted_are_the_ones_enforced():
    # The surfaces' own tests (test_cli, test_openai_api, test_manager) hold each limit.
    stated = re.search(r"Long text \(up to ([\d,]+) characters in the Synthesize tab, `synth`"
                       r" and the API; an A/B\ncomparison and a `bench --text` row time one "
                       r"generation, of up to ([\d,]+)\)", README)
    assert stated
    assert [int(n.replace(",", "")) for n in stated.groups()] == [MAX_LONG_TEXT_CHARS,
                                                                   MAX_TEXT_CHARS]


def test_the_layout_lists_every_module():
    layout = README.split("## Layout", 1)[1]
    listed = set(re.findall(r"^  (\w+\.py) ", layout, re.MULTILINE))
    modules = {path.name for path in (ROOT / "chatterbox_demo").glob("*.py")
               if not path.name.startswith("__")}
    assert listed == modules


def test_the_openai_example_says_where_its_client_comes_from():
    assert "(`pip install openai`" in README
    dev = (ROOT / "requirements-dev.txt").read_text()
    assert re.search(r"^openai==", dev, re.MULTILINE)  # what `make test` installs
