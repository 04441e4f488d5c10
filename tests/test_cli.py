"""The command line, as a user runs it (subprocesses, ~9 s each: kept to five) and in-process
through ``cli.main`` where no model load is needed or the session's model can be reused."""

import json
import os
import subprocess
import sys

import pytest
import soundfile as sf
from conftest import REPO, SHIPPED, VOICES_DIR, slow_first_variant_build, write_audio

from chatterbox_demo import cli
from chatterbox_demo.config import DEVICE_PRESETS, config_from_spec
from chatterbox_demo.manager import ModelManager

REPORT_KEYS = {"audio_seconds", "sample_rate", "weights", "weights_identity", "device", "preset",
               "voice", "timings", "rtf", "params", "out"}
TIMING_KEYS = {"conditioning_s", "t3_s", "t3_tokens", "t3_tokens_per_s", "s3gen_s",
               "watermark_s", "total_s", "build_s"}


def run_cli(cache, *args, timeout=180, **settings):
    env = {**os.environ, "CHATTERBOX_DEMO_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           **settings}
    env.pop("CHATTERBOX_WEIGHTS", None)
    return subprocess.run([sys.executable, "-m", "chatterbox_demo", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc, *words):
    """Exit status 2, nothing on stdout, and the last stderr line is the one error line.

    Loading the model may log warnings first (the random-weights banner, upstream
    deprecation notices); the error itself is exactly one line starting with 'error:'."""
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert lines[-1] == errors[0]
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


# --- subprocesses ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cli-cache")


@pytest.fixture(scope="module")
def added(cli_cache, tmp_path_factory):
    """Process 1: `voices add`."""
    clip = write_audio(tmp_path_factory.mktemp("cli-audio") / "mine.flac", seconds=3.0,
                       sample_rate=22050, seed=4)
    proc = run_cli(cli_cache, "voices", "add", "My Voice", str(clip), "--exaggeration", "0.6",
                   "--weights", "tiny", "--device", "cpu", "--json")
    return proc, clip


def test_voices_add(added, cli_cache):
    proc, clip = added
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout)
    assert row == {"name": "My Voice", "kind": "user", "exaggeration": 0.6, "seconds": 3.0}
    index = json.loads((cli_cache / "voices.json").read_text())
    assert [v["name"] for v in index["voices"]] == ["My Voice"]
    assert len(list((cli_cache / "conds").glob("*/*.pt"))) == len(SHIPPED) + 1


def test_synth_in_a_new_process_reuses_the_disk_cache(added, cli_cache, tmp_path):
    """Process 2: the conditionals computed by process 1 are read from disk, not recomputed."""
    assert added[0].returncode == 0, added[0].stderr
    out = tmp_path / "speech.wav"
    before = sorted(p.name for p in (cli_cache / "conds").glob("*/*.pt"))
    proc = run_cli(cli_cache, "synth", "--text", "Testing the command line, one two three.",
                   "--voice", "my voice", "--out", str(out), "--seed", "3", "--max-tokens", "10",
                   "--weights", "tiny", "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1  # one JSON object; upstream chatter is on stderr
    report = json.loads(proc.stdout)
    assert set(report) == REPORT_KEYS
    assert set(report["timings"]) == TIMING_KEYS
    assert report["voice"] == {"name": "My Voice", "source": "disk"}
    assert report["timings"]["conditioning_s"] < 0.5  # a file read, not a model run
    assert report["weights"] == "tiny" and report["device"] == "cpu"
    assert report["preset"] == DEVICE_PRESETS["cpu"]  # the app starts on the fastest preset
    assert 1 <= report["timings"]["t3_tokens"] <= 10
    assert report["params"]["exaggeration"] == 0.6 and report["params"]["seed"] == 3
    assert report["out"] == str(out)
    # Nothing was recomputed or added to the cache.
    assert sorted(p.name for p in (cli_cache / "conds").glob("*/*.pt")) == before

    info = sf.info(out)
    assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
    assert info.frames == pytest.approx(report["audio_seconds"] * 24000, abs=2)
    samples, _ = sf.read(out)
    assert abs(samples).max() > 0


def test_voices_list_json(added, cli_cache):
    """Process 3. A bad setting only the page reads does not stop the CLI (it was a
    traceback at import)."""
    proc = run_cli(cli_cache, "voices", "list", "--json", "--weights", "tiny",
                   CHATTERBOX_QUEUE_MAX="lots", CHATTERBOX_UPLOAD_TTL="0")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["name"], r["kind"]) for r in rows] == [
        *((name, "shipped") for name in SHIPPED), ("My Voice", "user")]
    assert all(set(r) == {"name", "kind", "exaggeration", "seconds"} for r in rows)


def test_empty_text_is_one_error_line(cli_cache, tmp_path):
    """Process 4: refused before the model is even loaded."""
    out = tmp_path / "never.wav"
    proc = run_cli(cli_cache, "synth", "--text", "   ", "--out", str(out), "--weights", "tiny")
    assert_user_error(proc, "error: Enter some text to speak.")
    assert proc.stderr.strip().splitlines() == ["error: Enter some text to speak."]
    assert not out.exists()


def test_unknown_voice_is_one_error_line(added, cli_cache, tmp_path):
    """Process 5."""
    out = tmp_path / "never.wav"
    proc = run_cli(cli_cache, "synth", "--text", "Hello.", "--voice", "nobody", "--out",
                   str(out), "--weights", "tiny")
    line = assert_user_error(proc, "Unknown voice 'nobody'", "My Voice", *SHIPPED)
    assert line.startswith("error: Unknown voice")
    # Found from the library's files: no model loaded, so nothing logged before it.
    assert proc.stderr.strip().splitlines() == [line]
    assert not out.exists()


@pytest.mark.parametrize("voice", ["my-clip.wav", "clips/speaker"])
def test_a_missing_clip_is_named_as_a_file(cli_cache, tmp_path, voice):
    """It said "Unknown voice 'my-clip.wav'" and listed the voices."""
    out = tmp_path / "never.wav"
    proc = run_cli(cli_cache, "synth", "--text", "Hello.", "--voice", voice, "--out",
                   str(out), "--weights", "tiny")
    assert_user_error(proc, f"Audio file '{voice}' does not exist", "voices list")
    assert not out.exists()


# --- in-process -----------------------------------------------------------------------------


@pytest.fixture
def no_instance(monkeypatch):
    """cli.run replaces the process-wide manager; put the old one back afterwards."""
    monkeypatch.setattr(ModelManager, "_instance", None)


@pytest.fixture
def shared_cli(make_manager, monkeypatch, no_instance):
    """Route cli.run's ModelManager.configure to a manager on the session's tiny model."""
    manager = make_manager()
    seen = []

    def configure(cls, **kwargs):
        seen.append(kwargs)
        return manager

    monkeypatch.setattr(ModelManager, "configure", classmethod(configure))
    manager.configure_calls = seen
    return manager


def main(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--weights", "bogus"], "Unknown weights source 'bogus'; available: auto, hub"),
        (["--weights", "local:"], "local: needs a directory"),
        (["--device", "tpu"], "Unknown device 'tpu'"),
        (["--temperature", "99"], "temperature must be between 0.05 and 5.0"),
        (["--cfg-weight", "nan"], "cfg_weight must be between 0.0 and 1.0"),
        (["--max-tokens", "0"], "max_new_tokens must be between 1 and 1000"),
        (["--seed", "-1"], "seed must be between 0 and"),
        (["--text", ""], "Enter some text to speak"),
        (["--text", "?!"], "it needs letters or digits"),
        (["--preset", "warp"], "Unknown preset 'warp'; available: baseline, cached"),
        (["--text", "a" * 20_001], "the limit is 20000"),
        (["--text", "\x07\x1b"], "Enter some text to speak"),
        (["--preset", "gpu-fast"], "cannot run on cpu"),
        (["--preset", "gpu-compiled"], "cpu-fast runs here."),
        (["--preset", "cached+cfm_cfg=maybe"], "cfm_cfg must be true or false"),
        # The text and the settings before the preset is built (minutes when compiled).
        (["--text", "", "--preset", "cpu-fast"], "Enter some text to speak"),
        (["--preset", "cached", "--temperature", "99"], "temperature must be between"),
    ],
)
def test_user_errors_before_loading(capsys, tmp_path, no_instance, monkeypatch, argv, words):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli.ModelManager, "load", no_model)
    args = ["synth", "--text", "Hello.", "--out", str(tmp_path / "x.wav"), "--weights", "tiny",
            "--device", "cpu", *argv]
    code, out, err = main(capsys, *args)
    assert code == 2 and out == ""
    assert err.splitlines() == [err.strip()] and err.startswith("error: ")
    assert words in err
    assert not (tmp_path / "x.wav").exists()


@pytest.mark.parametrize("argv, words", [
    (["synth", "--out", "{folder}"], "--out '{folder}' is a folder"),
    (["synth", "--out", "{file}/x.wav"], "'{file}' is a file, not a folder"),
    # WAV data under another type's name: players refused it or took it for noise.
    (["synth", "--out", "{folder}/hi.mp3"], "--out '{folder}/hi.mp3': end it in one of .wav"),
    pytest.param(["synth", "--out", "/proc/x.wav"], "cannot write in '/proc'",  # even as root
                 marks=pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="Linux")),
    (["bench", "--json", "{folder}"], "--json '{folder}' is a folder"),
    (["bench", "--json", "{folder}/missing/b.json"], "the folder '{folder}/missing' does not"),
    (["bench", "--markdown", "{file}/b.md"], "'{file}' is a file, not a folder"),
    (["bench", "--plot", "{folder}/chart.txt"], "end it in one of .eps, .jpeg"),
    # matplotlib writes .pgf through LaTeX, which failed after the whole benchmark
    (["bench", "--plot", "{folder}/chart.pgf"], ".pdf, .png, .ps, .raw"),
    (["bench", "--presets", " , "], "--presets names no preset"),
    # One file for two results: the later write replaced the earlier one.
    (["bench", "--json", "{folder}/b.png", "--markdown", "{folder}/b.png"],
     "--json and --markdown name the same file"),
    (["bench", "--json", "{folder}/b.png", "--plot", "{folder}/../folder/./b.png"],
     "--json and --plot name the same file"),
    (["bench", "--markdown", "{folder}/b.png", "--plot", "{link}/b.png"],
     "--markdown and --plot name the same file"),
    (["bench", "--text", "?!"], "nothing to speak"),
    # Every row failed at 2 or 3 ("stopped before producing any speech"), 4 ran.
    (["bench", "--tokens", "3"], "--tokens must be between 4 and 1000 (got 3)"),
    # The sweep's chart is speed against fidelity: without fidelity it was empty.
    (["bench", "--sweep", "--no-fidelity", "--plot", "{folder}/sweep.png"],
     "--plot with --sweep draws speed against fidelity: leave out --no-fidelity"),
    (["bench", "--text", "a" * 1001], "the limit is 1000"),  # a row is one generation
])
def test_bad_outputs_and_bench_inputs_fail_before_loading(capsys, tmp_path, no_instance,
                                                          monkeypatch, argv, words):
    """Checked before the model loads: after the work, a path that cannot be written
    threw its results away, and a text no row could speak made every row an error."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli.ModelManager, "load", no_model)
    folder, file, link = tmp_path / "folder", tmp_path / "file", tmp_path / "link"
    folder.mkdir()
    file.write_text("x")
    link.symlink_to(folder)
    argv = [arg.format(folder=folder, file=file, link=link) for arg in argv]
    rest = {"synth": ["--text", "Hello."], "bench": ["--tokens", "4"]}
    code, out, err = main(capsys, argv[0], *rest[argv[0]], *argv[1:], "--weights", "tiny",
                          "--device", "cpu")
    assert (code, out) == (2, "")
    assert err.splitlines() == [err.strip()] and err.startswith("error: ")
    assert words.format(folder=folder, file=file) in err


def test_an_os_error_is_one_error_line(capsys, monkeypatch):
    """The last resort, for a file that fails past the checks."""
    def denied(args):
        raise PermissionError(13, "Permission denied", "out.wav")

    monkeypatch.setattr(cli, "run", denied)
    code, out, err = main(capsys, "voices", "list")
    assert (code, out) == (2, "")
    assert err == "error: [Errno 13] Permission denied: 'out.wav'\n"


def test_in_process_bench_json_is_strict(shared_cli, capsys, tmp_path):
    """baseline's mel matches fp32's exactly: an SNR of inf, which JSON has no word for
    (Python wrote Infinity); null in the JSON, inf in the table."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    table = tmp_path / "bench.md"
    code, stdout, err = main(capsys, "bench", "--presets", "baseline", "--tokens", "4",
                             "--text", "Hi there.", "--json", "--markdown", str(table))
    assert code == 0, err
    row = json.loads(stdout, parse_constant=refuse)["rows"][0]
    assert row["mel_snr_db"] is None and row["logits_cosine"] == 1.0
    assert "| inf |" in table.read_text()


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["synth", "--out", "x.wav"])  # --text is required
    assert info.value.code == 2
    assert "--text" in capsys.readouterr().err


def test_in_process_synth_text_report(shared_cli, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CHATTERBOX_DEMO_CACHE", str(tmp_path / "env-cache"))
    out = tmp_path / "a.wav"
    code, stdout, err = main(capsys, "synth", "--text", "In process.", "--voice", "CALM-MID",
                             "--out", str(out), "--max-tokens", "6", "--weights", "tiny",
                             "--device", "cpu")
    assert code == 0, err
    assert stdout.startswith(f"wrote {out} (") and "conditioning" in stdout
    assert "(disk)" in stdout and "T3" in stdout and "S3Gen" in stdout
    assert len(stdout.splitlines()) == 1
    assert sf.info(out).samplerate == 24000
    assert shared_cli.configure_calls == [{
        "weights_spec": "tiny", "device": "cpu", "cache_dir": str(tmp_path / "env-cache"),
        "prepare_preset": False}]


def test_in_process_synth_with_a_clip_path_and_baseline(shared_cli, capsys, tmp_path,
                                                        make_wav):
    clip = make_wav("adhoc.wav", seed=8)
    out = tmp_path / "b.wav"
    code, stdout, err = main(capsys, "synth", "--text", "From a file.", "--voice", str(clip),
                             "--out", str(out), "--max-tokens", "6", "--preset", "baseline",
                             "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["voice"] == {"name": "adhoc.wav", "source": "computed"}
    assert report["preset"] == "baseline"
    assert "adhoc.wav" not in shared_cli.library.names()


def test_in_process_synth_with_a_changed_preset(shared_cli, capsys, tmp_path):
    code, stdout, err = main(capsys, "synth", "--text", "Changed.", "--voice", "calm-mid",
                             "--out", str(tmp_path / "f.wav"), "--max-tokens", "6",
                             "--preset", "cached+cfm_steps=4", "--json")
    assert code == 0, err
    assert json.loads(stdout)["preset"] == "cached+cfm_steps=4"
    # Rounded as every other figure (it printed 0.00010054899939859752 with --preset).
    assert all(value == round(value, 4) for value in json.loads(stdout)["timings"].values())
    assert shared_cli.config == config_from_spec("cached+cfm_steps=4")
    assert shared_cli.config.cfm_steps == 4


def test_in_process_synth_counts_preparing_the_preset_apart(shared_cli, capsys, tmp_path,
                                                            monkeypatch):
    """Building (or compiling) the preset's variant before the run is ``build_s``, not part
    of ``total_s``, and the text report says how long it took."""
    slow_first_variant_build(shared_cli, monkeypatch, seconds=2.0)
    args = ["synth", "--text", "Prepared first.", "--voice", "calm-mid", "--max-tokens", "6"]
    code, stdout, err = main(capsys, *args, "--out", str(tmp_path / "d.wav"),
                             "--preset", "t3-int8")
    assert code == 0, err
    # The 2 s slept while building, plus the real build (about a second on a loaded CI
    # machine), are reported apart, not in total_s.
    assert float(stdout.split("; the preset was prepared in ")[1].split(" s")[0]) >= 2.0
    assert float(stdout.split(" s of audio) in ")[1].split(" s:")[0]) < 2.0  # total_s
    code, stdout, err = main(capsys, *args, "--out", str(tmp_path / "e.wav"),
                             "--preset", "t3-int8", "--json")
    timings = json.loads(stdout)["timings"]
    assert timings["build_s"] < 0.1 and timings["total_s"] < 2.0  # built already


def test_in_process_one_token_budget_is_one_error_line(shared_cli, capsys, tmp_path):
    out = tmp_path / "c.wav"
    code, stdout, err = main(capsys, "synth", "--text", "Hi.", "--voice", "calm-mid",
                             "--out", str(out), "--max-tokens", "1")
    assert (code, stdout) == (2, "")
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        err.strip().splitlines()[-1]]
    assert "error: The model stopped before producing any speech" in err
    assert not out.exists()


def test_in_process_voice_management(shared_cli, capsys, make_wav):
    clip = make_wav("v.wav", seed=12)
    assert main(capsys, "voices", "add", "Zoe", str(clip))[:2] == (0, "added voice 'Zoe'\n")
    assert main(capsys, "voices", "rename", "zoe", "Zed")[:2] == (0, "renamed to 'Zed'\n")
    code, out, _ = main(capsys, "voices", "list")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines] == [*SHIPPED, "Zed"]
    assert lines[-1].split()[1:] == ["user", "exaggeration", "0.50"]
    code, out, err = main(capsys, "voices", "remove", "calm-mid")
    assert (code, out) == (2, "")
    assert err.strip() == "error: 'calm-mid' ships with the app and cannot be removed."
    code, out, err = main(capsys, "voices", "add", "../etc", str(clip))
    assert code == 2 and "looks like a path" in err
    assert main(capsys, "voices", "remove", "ZED", "--json")[:2] == (
        0, json.dumps({"name": "Zed", "kind": "user", "exaggeration": 0.5, "seconds": 2.0})
        + "\n")
    assert shared_cli.library.names() == list(SHIPPED)


@pytest.mark.parametrize("voice", ["calm-mid", str(VOICES_DIR / "calm-mid.wav")],
                         ids=["library-name", "clip-path"])
def test_in_process_synth_of_a_long_text_file_reports_chunk_progress(shared_cli, capsys,
                                                                     tmp_path, voice):
    # Past the 1,000 characters one generation takes, whether the voice is named or a clip.
    text_file = tmp_path / "story.txt"
    text_file.write_text(" ".join(f"Sentence {i} of a longer story, told slowly." for i in
                                  range(25)), encoding="utf-8")
    assert len(text_file.read_text(encoding="utf-8")) > 1000
    out = tmp_path / "story.wav"
    code, stdout, err = main(capsys, "synth", "--text-file", str(text_file), "--voice",
                             voice, "--out", str(out), "--max-tokens", "6", "--json")
    assert code == 0, err
    chunks = json.loads(stdout)["chunks"]
    assert len(chunks) >= 4
    assert f"[synth] chunk {len(chunks)} of {len(chunks)}" in err
    assert sf.info(out).samplerate == 24000


CLIP = str(VOICES_DIR / f"{SHIPPED[0]}.wav")


@pytest.mark.parametrize("argv, words", [
    (["synth", "--text", "Hi.", "--voice", "nobody"], "Unknown voice 'nobody'; available: "),
    (["synth", "--text", "Hi.", "--voice", "nobody.wav"], "Audio file 'nobody.wav' does not"),
    (["bench", "--voices", f"{SHIPPED[0]},nobody"], "Unknown voice 'nobody'"),
    (["bench", "--voice", "nobody"], "Unknown voice 'nobody'"),
    (["voices", "remove", "nobody"], "Unknown voice 'nobody'"),
    (["voices", "rename", "nobody", "somebody"], "Unknown voice 'nobody'"),
    (["voices", "rename", SHIPPED[0], "a/b"], "looks like a path"),
    (["voices", "add", "a/b", CLIP], "looks like a path"),
    (["voices", "add", "fine", CLIP, "--exaggeration", "9"], "between 0.0 and 2.0"),
    (["voices", "add", "fine", str(REPO / "README.md")], "not a readable audio file"),
])
def test_a_typo_is_refused_before_the_model_loads(capsys, tmp_path, no_instance, monkeypatch,
                                                   argv, words):
    # Found after loading (and, for synth, building the preset: minutes when compiled),
    # behind the loading messages.
    monkeypatch.setenv("CHATTERBOX_DEMO_CACHE", str(tmp_path / "cache"))
    if argv[0] == "synth":
        argv = [*argv, "--out", str(tmp_path / "never.wav")]
    code, out, err = main(capsys, *argv, "--weights", "tiny")
    assert code == 2 and out == "" and words in err and len(err.splitlines()) == 1, err
    assert ModelManager._instance.loaded is None


def test_the_library_settles_what_its_files_cannot(tmp_path, make_manager):
    # An index unreadable now: the library decides once loaded (and moves it aside).
    manager = make_manager(cache_dir=tmp_path / "cache", load=False)
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "cache" / "voices.json").write_text("{not json")
    manager.check_voice("nobody")
    manager.check_voice("BuiltIn")  # the weights' own voice: only loading tells
    manager.check_voice(SHIPPED[0].upper())  # names match as the library matches them
    manager.load()
    with pytest.raises(ValueError, match="Unknown voice 'nobody'"):
        manager.check_voice("nobody")


@pytest.mark.parametrize("content, words", [
    (None, "does not exist"),
    (b"\xff\xfe\x00bad", "as UTF-8 text"),
])
def test_a_bad_text_file_is_one_error_line(capsys, tmp_path, no_instance, content, words):
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    code, out, err = main(capsys, "synth", "--text-file", str(path), "--out",
                          str(tmp_path / "x.wav"), "--weights", "tiny")
    assert code == 2 and out == "" and words in err and len(err.splitlines()) == 1


def test_in_process_finetune_refuses_a_taken_name_before_training(shared_cli, capsys,
                                                                   tmp_path, monkeypatch):
    monkeypatch.setattr(shared_cli, "finetune", lambda *args, **kwargs: pytest.fail("trained"))
    code, out, err = main(capsys, "finetune", "train", str(tmp_path), "--out",
                          str(tmp_path / "adapter"), "--name", "calm-mid")
    assert (code, out) == (2, "")
    assert err.strip() == ("error: A voice named 'calm-mid' exists; it ships with the app; "
                           "choose another name.")


def test_in_process_finetune_says_where_the_adapter_is_when_its_name_went_meanwhile(
        shared_cli, capsys, tmp_path, monkeypatch):
    """The name is checked before training; taken by another process meanwhile, the end
    said only that it exists, though the adapter was written."""
    from chatterbox_demo.voices import VoiceError

    def taken(*args, **kwargs):
        raise VoiceError("A voice named 'Ann' exists; choose another name or remove that "
                         "one first.")

    monkeypatch.setattr(shared_cli, "finetune", lambda *args, **kwargs: {})
    monkeypatch.setattr(shared_cli, "add_finetuned_voice", taken)
    out = tmp_path / "adapter"
    code, _, err = main(capsys, "finetune", "train", str(tmp_path), "--out", str(out),
                        "--name", "Ann")
    assert code == 2
    assert err.strip().endswith(f"The adapter is written: add it with `python -m "
                                f"chatterbox_demo finetune import {out} --name NAME`.")


def test_in_process_a_damaged_adapter_is_not_imported(shared_cli, capsys, tmp_path):
    import torch
    from safetensors.torch import save_file

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    card = {"version": 1, "method": "lora", "base_weights": shared_cli.loaded.identity,
            "settings": {"rank": 2, "alpha": 4.0}}
    (adapter / "card.json").write_text(json.dumps(card))
    shared_cli.library.conditionals(shared_cli.library.get("calm-mid"))[0].save(
        adapter / "conds.pt")
    weights = adapter / "adapter.safetensors"
    save_file({"layers.0.self_attn.q_proj.lora_A": torch.zeros(2, 1024),
               "layers.0.self_attn.q_proj.lora_B": torch.zeros(1024, 2)}, weights)
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # a copy that stopped half-way
    code, out, err = main(capsys, "finetune", "import", str(adapter), "--name", "broken")
    assert (code, out) == (2, "")
    assert err.startswith("error: ") and "adapter.safetensors is damaged" in err
    assert len(err.splitlines()) == 1
    assert "broken" not in shared_cli.library.names()


def fake_bench(rows: list[dict], voices=("calm-mid",)) -> dict:
    """A bench result as bench.run returns it, without measuring anything."""
    return {"machine": {"cpu": "CPU", "cores": 2, "torch": "2.6.0", "device": "cpu",
                        "weights": "tiny"},
            "settings": {"text": "Hi.", "voices": list(voices), "tokens": 8, "repeats": 1,
                         "seed": 0, "stream": False},
            "rows": rows}


MEASURED = {"preset": "cached", "voice": "calm-mid", "conditioning_s": 0.1, "t3_s": 0.5,
            "s3gen_s": 0.3, "watermark_s": 0.05, "total_s": 0.95, "mel_snr_db": 20.0}


@pytest.fixture
def bench_without_model(monkeypatch, tmp_path, no_instance):
    """`bench` in process with bench.run answering ``fake_bench([MEASURED])`` (replace
    ``.result`` to change it), and the model never loaded."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    def run(manager, presets, **kwargs):
        return state.result

    state = run
    state.result = fake_bench([MEASURED])
    monkeypatch.setenv("CHATTERBOX_DEMO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli.ModelManager, "load", no_model)
    monkeypatch.setattr(cli.bench, "run", run)
    return state


@pytest.mark.parametrize("flag, name", [("--json", "bench.json"), ("--markdown", "bench.md"),
                                        ("--plot", "bench.png")])
def test_a_failed_result_write_leaves_the_earlier_file_whole(capsys, tmp_path, monkeypatch,
                                                             bench_without_model, flag, name):
    """A full disk cut the earlier bench.json short: the results are written beside the
    path and renamed over it only when whole."""
    import errno
    from pathlib import Path

    out = tmp_path / "out"
    out.mkdir()
    (out / name).write_bytes(b"the earlier, whole result")

    def fill_the_disk(path, data):
        with open(path, "wb") as file:
            file.write(data[:10] if isinstance(data, bytes) else data[:10].encode())
        raise OSError(errno.ENOSPC, "No space left on device")

    for method in ("write_text", "write_bytes"):  # savefig: to a file or through bytes
        def write(self, data, *args, real=getattr(Path, method), **kwargs):
            if name in self.name:  # bench.json or the .bench.json.tmpPID beside it
                fill_the_disk(self, data)
            return real(self, data, *args, **kwargs)

        monkeypatch.setattr(Path, method, write)
    from matplotlib.figure import Figure

    def savefig(self, target, *args, real=Figure.savefig, **kwargs):
        if isinstance(target, Path) and name in target.name:
            fill_the_disk(target, b"\x89PNG\r\n\x1a\n")
        return real(self, target, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    code, stdout, err = main(capsys, "bench", "--weights", "tiny", "--device", "cpu",
                             flag, str(out / name))
    assert (code, stdout) == (2, "")
    assert err == "error: [Errno 28] No space left on device\n"
    assert (out / name).read_bytes() == b"the earlier, whole result"
    assert [path.name for path in out.iterdir()] == [name]  # no half-written leftovers


@pytest.mark.parametrize("errors, reason", [
    (["GenerationError: too short", "GenerationError: too short"], "(GenerationError: too short)"),
    (["ValueError: unavailable on cpu", "GenerationError: too short"], "the [bench] lines above"),
])
def test_a_bench_that_measured_nothing_fails_and_keeps_earlier_files(
        capsys, tmp_path, bench_without_model, errors, reason):
    """Exit 0 with nothing measured read as success to a script, and the table and chart
    of errors replaced an earlier run's."""
    bench_without_model.result = fake_bench(
        [{"preset": preset, "voice": "calm-mid", "error": error}
         for preset, error in zip(["cached", "cpu-fast"], errors, strict=True)])
    paths = {flag: tmp_path / f"bench.{suffix}" for flag, suffix in
             [("--json", "json"), ("--markdown", "md"), ("--plot", "png")]}
    for path in paths.values():
        path.write_text("earlier")
    code, out, err = main(capsys, "bench", "--weights", "tiny", "--device", "cpu",
                          *[str(part) for pair in paths.items() for part in pair])
    assert (code, out) == (2, "")
    assert err.splitlines() == [err.strip()] and err.startswith("error: Nothing was measured")
    assert reason in err
    assert all(path.read_text() == "earlier" for path in paths.values())


@pytest.mark.parametrize("what, words", [
    ("folder", "already holds files (clip000.wav); give a new or empty folder"),
    ("file", "is a file; give the path of a new or empty folder"),
    ("under a file", "Cannot make the folder"),
])
def test_demo_data_never_writes_over_a_users_files(capsys, tmp_path, what, words):
    """It wrote clipNNN.wav and .txt over a folder's own clips, and over a file said
    '[Errno 17] File exists'."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "clip000.wav").write_bytes(b"my own recording")
    (tmp_path / "notes.txt").write_text("my notes")
    target = {"folder": mine, "file": tmp_path / "notes.txt",
              "under a file": tmp_path / "notes.txt" / "data"}[what]
    code, out, err = main(capsys, "finetune", "demo-data", str(target), "--clips", "2")
    assert (code, out) == (2, "")
    assert err.splitlines() == [err.strip()] and err.startswith("error: ")
    assert words in err
    assert (mine / "clip000.wav").read_bytes() == b"my own recording"
    assert sorted(path.name for path in mine.iterdir()) == ["clip000.wav"]
    assert (tmp_path / "notes.txt").read_text() == "my notes"


def test_demo_data_fills_an_empty_folder(capsys, tmp_path):
    code, out, err = main(capsys, "finetune", "demo-data", str(tmp_path), "--clips", "2")
    assert code == 0, err
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "clip000.txt", "clip000.wav", "clip001.txt", "clip001.wav"]


def test_synth_help_names_the_presets_used_by_default(capsys):
    """It said "default: cached", but the default is the device's preset."""
    with pytest.raises(SystemExit):
        cli.main(["synth", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "default: the device's, " + ", ".join(
        f"{preset} on {device}" for device, preset in DEVICE_PRESETS.items()) in text


def test_finetune_train_refuses_a_file_as_out_before_loading(capsys, tmp_path, no_instance,
                                                              monkeypatch):
    """It said '[Errno 17] File exists' once the model had loaded."""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli.ModelManager, "load", no_model)
    monkeypatch.setenv("CHATTERBOX_DEMO_CACHE", str(tmp_path / "cache"))
    taken = tmp_path / "adapter"
    taken.write_text("not an adapter")
    code, out, err = main(capsys, "finetune", "train", str(tmp_path), "--out", str(taken),
                          "--weights", "tiny", "--device", "cpu")
    assert (code, out) == (2, "")
    assert err == (f"error: --out {str(taken)!r} is a file; give a folder for the adapter "
                   "(a new one, or one that holds an earlier adapter).\n")
    assert taken.read_text() == "not an adapter"


def test_ctrl_c_is_one_line_and_leaves_saved_files(capsys, tmp_path, monkeypatch):
    """Ctrl-C printed a traceback; a result being written then is left as it was."""
    from chatterbox_demo.files import write_atomically

    saved = tmp_path / "bench.json"
    saved.write_text("the earlier result")

    def write_half(tmp):
        tmp.write_text("half of a new")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run", lambda args: write_atomically(saved, write_half))
    code, out, err = main(capsys, "voices", "list")
    assert (code, out, err) == (130, "", "interrupted\n")
    assert saved.read_text() == "the earlier result"
    assert [path.name for path in tmp_path.iterdir()] == ["bench.json"]
