"""Speaker fine-tuning on the tiny model and a synthetic espeak-ng dataset: data checks,
training that learns and changes only what it should, adapters that load back exactly,
LoRA merged equal to LoRA applied, and voices that switch back to the base model exactly."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import speech_like, write_audio
from safetensors.torch import load_file

from chatterbox_demo import finetune, speaker_data
from chatterbox_demo.config import GenerationParams
from chatterbox_demo.finetune import FinetuneError, TrainSettings
from chatterbox_demo.speaker_data import DatasetError
from chatterbox_demo.weights import checkpoint_state

# Enough steps for the tiny model to learn the synthetic speaker, few enough to take seconds.
QUICK = dict(steps=30, lr=3e-3, batch=2, checkpoint_every=10)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    return speaker_data.make_espeak_dataset(tmp_path_factory.mktemp("speaker") / "data", 8)


@pytest.fixture(scope="session")
def prepared(tiny_manager, dataset):
    return tiny_manager.prepare_dataset(dataset)


@pytest.fixture(scope="session")
def lora_dir(tiny_manager, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapters") / "lora"
    tiny_manager.finetune(dataset, out, TrainSettings(method="lora", **QUICK))
    return out


def state_of(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- data -------------------------------------------------------------------------------------


def test_a_dataset_is_checked_tokenized_and_cached(tiny_manager, dataset, prepared,
                                                   monkeypatch):
    assert len(prepared.examples) == 8 and not prepared.problems
    example = prepared.examples[0]
    assert example.text_tokens and len(example.speech_tokens) == pytest.approx(
        example.seconds * 25, abs=2)
    assert (dataset / speaker_data.CACHE_NAME).exists()
    # A second prepare reads the cache: the tokenizer is not needed again.
    monkeypatch.setattr(tiny_manager.loaded.tts.s3gen.tokenizer, "forward",
                        lambda *a, **k: pytest.fail("tokenized again"))
    again = tiny_manager.prepare_dataset(dataset)
    assert again.examples == prepared.examples and again.data_hash == prepared.data_hash


def test_a_moved_dataset_keeps_its_tokens_and_takes_its_own_reference_clip(tiny_manager,
                                                                           dataset, tmp_path):
    def prepare(folder):
        tokenized = []
        data = speaker_data.prepare(folder, tiny_manager.loaded.tts,
                                    tiny_manager.loaded.identity,
                                    lambda share, what: tokenized.append(what))
        return data, len(tokenized)

    folder = tmp_path / "speaker"
    shutil.copytree(dataset, folder, ignore=shutil.ignore_patterns(".chatterbox*"))
    first, tokenized = prepare(folder)
    assert tokenized == 8 and Path(first.reference).parent == folder
    moved = tmp_path / "moved"
    shutil.move(folder, moved)
    data, tokenized = prepare(moved)
    assert tokenized == 0  # read from the cache
    assert data.reference == str(moved / Path(first.reference).name)
    # A cache from before: the reference as an absolute path, here the clip of another copy
    # of the folder. Stale: tokenized again, and the reference is this folder's own.
    cache = moved / speaker_data.CACHE_NAME
    body = json.loads(cache.read_text())
    cache.write_text(json.dumps({**body, "reference": str(dataset / Path(first.reference).name)}))
    data, tokenized = prepare(moved)
    assert tokenized == 8 and data.reference == str(moved / Path(first.reference).name)


def test_bad_clips_are_reported_one_line_each_and_the_rest_go_on(tiny_manager, dataset,
                                                                  tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(dataset, folder, ignore=shutil.ignore_patterns(".chatterbox*"))
    (folder / "clip000.txt").write_text("   ")  # empty transcript
    (folder / "clip001.txt").unlink()  # audio without transcript
    (folder / "orphan.txt").write_text("No audio for this one.")
    (folder / "broken.wav").write_bytes(b"not audio at all")
    (folder / "broken.txt").write_text("A broken file.")
    sf.write(folder / "blip.wav", np.zeros(2400, np.float32) + 0.1, 24000)  # 0.1 s
    (folder / "blip.txt").write_text("Too short.")
    hum = 5e-4 * np.sin(np.linspace(0, 2000, 48000, dtype=np.float32))  # -66 dBFS, 2 s
    sf.write(folder / "hum.wav", hum, 24000)
    (folder / "hum.txt").write_text("Too quiet to be speech.")
    sf.write(folder / "loud.wav", hum * 1e30, 24000, subtype="FLOAT")  # finite, absurd
    (folder / "loud.txt").write_text("Far outside full scale.")
    data = tiny_manager.prepare_dataset(folder)
    report = "\n".join(data.problems)
    assert "clip000: empty transcript" in report
    assert "clip001.wav: no transcript" in report
    assert "orphan.txt: no audio" in report
    assert "broken: audio broken.wav is unreadable" in report
    assert "blip: 0.1 s long" in report
    assert "hum: audio is silent" in report  # the voice library's threshold
    assert "loud: audio is silent or damaged" in report  # and its other one
    assert len(data.examples) == 6  # the 8 clips less the two damaged ones
    assert "6 clips usable" in data.report()


def test_the_ljspeech_layout_and_unusable_folders(tiny_manager, dataset, tmp_path):
    folder = tmp_path / "lj"
    (folder / "wavs").mkdir(parents=True)
    lines = []
    for wav in sorted(dataset.glob("*.wav"))[:3]:
        shutil.copy(wav, folder / "wavs" / wav.name)
        lines.append(f"{wav.stem}|{wav.with_suffix('.txt').read_text().strip()}")
    lines += ["missing|This clip has no audio.", "nocolumn", "../up|Escaping."]
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    data = tiny_manager.prepare_dataset(folder)
    assert len(data.examples) == 3
    assert any("missing: audio missing.wav is missing" in p for p in data.problems)
    assert any("expected 'id|text'" in p for p in data.problems)
    assert any("is not a file name" in p for p in data.problems)
    with pytest.raises(DatasetError, match="is not a folder"):
        tiny_manager.prepare_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="has no clips"):
        tiny_manager.prepare_dataset(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.wav").write_bytes(b"junk")
    (tmp_path / "bad" / "a.txt").write_text("Junk.")
    with pytest.raises(DatasetError, match="No usable clip"):
        tiny_manager.prepare_dataset(tmp_path / "bad")


def test_a_clip_with_a_nan_or_inf_sample_is_left_out_not_the_dataset(tmp_path):
    # Resampling to 16 kHz is where librosa meets the bad sample, and it raises its own
    # error: that must be this clip's note, not the whole dataset's traceback.
    for name, bad in (("nan", np.nan), ("inf", np.inf)):
        data = speech_like(1.5, 24000)
        data[100, 0] = bad
        path = write_audio(tmp_path / f"{name}.wav", sample_rate=24000, subtype="FLOAT",
                           data=data)
        wav, problem = speaker_data.check_clip(speaker_data.Clip(name, path, "Hello there."))
        assert wav is None and problem == f"{name}: audio is silent or damaged"


def test_windows_transcripts_and_upper_case_extensions_are_read(tmp_path):
    bom = "\ufeff"  # what Notepad and Excel's "CSV UTF-8" put first
    pairs = tmp_path / "pairs"
    write_audio(pairs / "X.WAV")
    (pairs / "X.TXT").write_text(bom + "Hello there.", encoding="utf-8")
    write_audio(pairs / "y.wav")
    (pairs / "y.Txt").write_text("General text.", encoding="utf-8")
    clips, problems = speaker_data.find_clips(pairs)
    assert not problems
    assert [(c.id, c.audio.name, c.text) for c in clips] == [
        ("X", "X.WAV", "Hello there."), ("y", "y.wav", "General text.")]
    lj = tmp_path / "lj"
    write_audio(lj / "wavs" / "a1.wav")
    write_audio(lj / "wavs" / "A2.WAV")
    (lj / "metadata.csv").write_text(bom + "a1|Hello there.\nA2|General text.\n",
                                     encoding="utf-8")
    clips, problems = speaker_data.find_clips(lj)
    assert not problems
    assert [(c.id, c.audio.name, c.text) for c in clips] == [
        ("a1", "a1.wav", "Hello there."), ("A2", "A2.WAV", "General text.")]
    assert all(speaker_data.check_clip(c)[1] is None for c in clips)
    windows = tmp_path / "windows"
    write_audio(windows / "Wavs" / "a1.wav")
    (windows / "METADATA.CSV").write_text("a1|Hello there.\n", encoding="utf-8")
    clips, problems = speaker_data.find_clips(windows)
    assert not problems and [(c.id, c.audio.parent.name) for c in clips] == [("a1", "Wavs")]


def test_a_metadata_file_in_another_encoding_says_to_save_it_as_utf8(tmp_path):
    folder = tmp_path / "lj"
    write_audio(folder / "wavs" / "a1.wav")
    (folder / "metadata.csv").write_bytes("a1|Café au lait.\n".encode("latin-1"))
    with pytest.raises(speaker_data.DatasetError,
                       match=r"metadata.csv is not UTF-8 text: save it as UTF-8"):
        speaker_data.find_clips(folder)


def test_ljspeech_audio_without_a_metadata_line_is_reported(tmp_path):
    folder = tmp_path / "lj"
    for name in ("a1.wav", "orphan.wav", "nocolumn.wav"):
        write_audio(folder / "wavs" / name)
    (folder / "metadata.csv").write_text("a1|Hello there.\nnocolumn\n")
    clips, problems = speaker_data.find_clips(folder)
    assert [c.id for c in clips] == ["a1"]
    # One line per file: the row without text is reported as such, not twice.
    assert problems == ["metadata.csv line 2: expected 'id|text'",
                        "wavs/orphan.wav: no transcript (no metadata.csv line for orphan)"]


def _zip_with(tmp_path, name, patch=None, **kwargs):
    import zipfile

    path = tmp_path / f"{name}.zip"
    with zipfile.ZipFile(path, "w", **kwargs) as archive:
        if patch is not None:
            archive.writestr("metadata.csv", b"a1|Hello there.\n" * 2000)
    if patch is not None:
        body = bytearray(path.read_bytes())
        patch(body)
        path.write_bytes(bytes(body))
    return path


def _encrypted(body):  # general-purpose flag bit 0, in the local and the central header
    body[6] |= 1
    body[body.find(b"PK\x01\x02") + 8] |= 1


def _deflate64(body):  # compression method 9, which Python's zipfile cannot unpack
    body[8] = 9
    body[body.find(b"PK\x01\x02") + 10] = 9


def _corrupt(body):
    body[60:90] = bytes(b ^ 0xFF for b in body[60:90])


@pytest.mark.parametrize("name, patch, kwargs, message", [
    ("empty", None, {}, "The zip is empty"),
    ("locked", _encrypted, {}, "password-protected: zip it again without a password"),
    ("deflate64", _deflate64, {}, "compression this app cannot unpack"),
    ("damaged", _corrupt, {"compression": 8}, "The zip is damaged"),
    ("damaged-bzip2", _corrupt, {"compression": 12}, "The zip is damaged"),
    ("damaged-lzma", _corrupt, {"compression": 14}, "The zip is damaged"),
])
def test_a_zip_that_cannot_be_unpacked_says_why(tmp_path, name, patch, kwargs, message):
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(DatasetError, match=message) as info:
        speaker_data.extract_zip(_zip_with(tmp_path, name, patch, **kwargs), work / "data")
    assert str(work) not in str(info.value)  # no server path in the message


def test_a_full_disk_while_unpacking_is_not_called_a_damaged_zip(tmp_path, monkeypatch):
    """bz2 reports garbled data as an OSError without an errno; the disk's own errors have
    one and must keep their message, not send the user to zip the folder again."""
    import errno
    import zipfile

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("metadata.csv", "a1|Hello there.\n")
    monkeypatch.setattr(zipfile.ZipFile, "extractall", disk_full)
    with pytest.raises(OSError, match="No space left") as info:
        speaker_data.extract_zip(archive, tmp_path / "data")
    assert not isinstance(info.value, DatasetError)


@pytest.mark.parametrize("values, message", [
    ({"method": "qlora"}, "method must be one of"),
    ({"target": ("q_proj", "wq")}, "target must name some of"),
    ({"rank": 0}, r"rank must be between 1 and 512 \(got 0\)"),
    ({"lr": float("nan")}, "lr must be between"),
    ({"steps": 2.5}, "steps must be a whole number"),
    # torch.manual_seed overflowed with a traceback once the model had loaded.
    ({"seed": 2**64}, "seed must be between 0 and 4294967295"),
])
def test_bad_settings_are_refused_with_the_reason(values, message):
    with pytest.raises(FinetuneError, match=message):
        TrainSettings(**values)


def test_short_target_names_expand():
    assert finetune.settings_from({"target": "q,v,gate"}).target == ("q_proj", "v_proj",
                                                                      "gate_proj")


# --- training ----------------------------------------------------------------------------------


def test_lora_learns_and_changes_only_the_adapter(tiny_manager, lora_dir):
    card = json.loads((lora_dir / "card.json").read_text())
    assert card["method"] == "lora" and card["steps"] == 30
    assert card["base_weights"] == tiny_manager.loaded.identity
    history = card["loss_history"]
    assert np.mean(history[-5:]) < 0.8 * np.mean(history[:5])  # the loss falls
    assert card["val_loss"] is not None and card["val_clips"] == 1
    state = load_file(lora_dir / "adapter.safetensors")
    assert state and all(k.endswith((".lora_A", ".lora_B")) for k in state)
    assert any(k.startswith("layers.0.self_attn.q_proj") for k in state)
    assert (lora_dir / "conds.pt").exists() and (lora_dir / "checkpoint.pt").exists()


def test_training_leaves_the_base_model_untouched(tiny_manager, dataset, tmp_path):
    before = state_of(tiny_manager.loaded.tts.t3)
    tiny_manager.finetune(dataset, tmp_path / "full",
                          TrainSettings(method="full", steps=3, lr=1e-3, batch=1))
    assert same_state(before, state_of(tiny_manager.loaded.tts.t3))


def test_merged_lora_gives_the_logits_of_the_applied_adapter(tiny_manager, lora_dir,
                                                              prepared):
    base = tiny_manager.loaded.tts.t3
    card = json.loads((lora_dir / "card.json").read_text())
    applied = copy.deepcopy(base)
    finetune.add_lora(applied, card["settings"]["rank"], card["settings"]["alpha"],
                      card["settings"]["target"])
    weights = load_file(lora_dir / "adapter.safetensors")
    with torch.no_grad():
        for name, param in applied.tfmr.named_parameters():
            for part in ("lora_A", "lora_B"):
                marker = f".{part}.default.weight"
                if name.endswith(marker):
                    param.copy_(weights[name[: -len(marker)] + f".{part}"])
    merged = finetune.adapted_t3(base, lora_dir, tiny_manager.loaded.identity)
    conds = tiny_manager.library.conditionals(tiny_manager.library.get("calm-mid"))[0]
    example = prepared.examples[0]

    def logits(t3):
        cond = finetune.speaker_cond(conds, 0.5, t3.device)
        with torch.no_grad():
            return finetune.example_loss(t3.eval(), cond, example.text_tokens,
                                         example.speech_tokens)[1]

    assert float(logits(merged)) == pytest.approx(float(logits(applied)), abs=1e-4)
    assert abs(float(logits(merged)) - float(logits(base))) > 1e-3  # it did change T3
    assert same_state(state_of(base), state_of(tiny_manager.loaded.tts.t3))


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tiny_manager, dataset, tmp_path):
    settings = TrainSettings(method="lora", steps=6, lr=3e-3, batch=2, checkpoint_every=3)
    tiny_manager.finetune(dataset, tmp_path / "straight", settings)
    halfway = TrainSettings(**{**settings.__dict__, "steps": 3})
    tiny_manager.finetune(dataset, tmp_path / "resumed", halfway)
    tiny_manager.finetune(dataset, tmp_path / "resumed", settings, resume=True)
    straight = load_file(tmp_path / "straight" / "adapter.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter.safetensors")
    assert same_state(straight, resumed)
    other = TrainSettings(**{**settings.__dict__, "rank": 4})
    with pytest.raises(FinetuneError, match="other settings"):
        tiny_manager.finetune(dataset, tmp_path / "resumed", other, resume=True)


def test_training_and_generations_beside_it_keep_their_seeds(tiny_manager, dataset,
                                                             tmp_path):
    """The page trains while generations run in other threads, and both draw from torch's
    process-wide random state: a generation there gave other audio for the same seed, and
    the training another adapter (a generation reseeds the state training's dropout draws
    from, and training's draws shifted the generation's samples)."""
    import threading

    import numpy as np

    settings = TrainSettings(method="lora", steps=6, lr=3e-3, batch=2, checkpoint_every=100)
    params = GenerationParams(seed=5, max_new_tokens=20)
    alone = tiny_manager.generate("Hello there.", "calm-mid", params)
    tiny_manager.finetune(dataset, tmp_path / "alone", settings)

    # Between steps, deterministically: a generation in the training's own progress report.
    between = []
    tiny_manager.finetune(dataset, tmp_path / "between", settings, progress=lambda *_: (
        between.append(tiny_manager.generate("Hello there.", "calm-mid", params))))
    # Side by side, in two threads.
    beside, done = [], threading.Event()

    def train():
        try:
            tiny_manager.finetune(dataset, tmp_path / "beside", settings)
        finally:
            done.set()

    threading.Thread(target=train).start()
    while not done.is_set():
        beside.append(tiny_manager.generate("Hello there.", "calm-mid", params))
    adapters = [load_file(tmp_path / run / "adapter.safetensors")
                for run in ("alone", "between", "beside")]
    assert same_state(adapters[0], adapters[1]) and same_state(adapters[0], adapters[2])
    assert len(between) == settings.steps and beside
    for synthesis in between + beside:
        assert synthesis.speech_tokens == alone.speech_tokens
        assert np.array_equal(synthesis.wav, alone.wav)


@pytest.fixture
def train_quickly(tiny_manager, prepared):
    """``train_quickly(out, settings, data=, base=, resume=)``: finetune.train on the
    session's tiny T3 and prepared clips, with the base weights' identity changeable."""
    conds = tiny_manager._compute_conditionals(Path(prepared.reference), 0.5)

    def run(out, settings, data=prepared, base=tiny_manager.loaded.identity, resume=False):
        return finetune.train(tiny_manager.loaded.tts.t3, conds, data, out, settings, base,
                              resume=resume)

    return run


def test_a_checkpoint_resumes_only_on_its_weights_clips_and_settings(train_quickly, prepared,
                                                                     tmp_path):
    out = tmp_path / "adapter"
    half = TrainSettings(method="speaker-adapter", steps=1, batch=1, val_fraction=0.0)
    whole = replace(half, steps=2)
    train_quickly(out, half)
    checkpoint = out / "checkpoint.pt"
    saved = checkpoint.read_bytes()
    with pytest.raises(FinetuneError, match="trained on the weights tiny:.*not the loaded "
                                            "hub:other.*without --resume"):
        train_quickly(out, whole, base="hub:other", resume=True)
    with pytest.raises(FinetuneError, match="other clips.*without --resume"):
        train_quickly(out, whole, data=dataclasses.replace(prepared, data_hash="x"),
                      resume=True)
    with pytest.raises(FinetuneError, match="method 'speaker-adapter', now 'lora'"):
        train_quickly(out, replace(whole, method="lora"), resume=True)
    assert checkpoint.read_bytes() == saved

    state = torch.load(checkpoint, weights_only=True)
    torch.save({**state, "shapes": [[1, 128]]}, checkpoint)
    with pytest.raises(FinetuneError, match="do not have this model's shapes"):
        train_quickly(out, whole, resume=True)
    # An older version's checkpoint records none of it: refused rather than guessed.
    torch.save({k: v for k, v in state.items()
                if k not in ("base_weights", "data_hash", "shapes")}, checkpoint)
    with pytest.raises(FinetuneError, match="older version.*Train again without --resume"):
        train_quickly(out, whole, resume=True)
    train_quickly(out, half)  # starting over replaces it
    assert train_quickly(out, whole, resume=True)["steps"] == 2


def test_a_failed_retrain_leaves_the_previous_adapter_whole(train_quickly, tmp_path,
                                                            monkeypatch):
    out = tmp_path / "adapter"
    quick = TrainSettings(steps=1, batch=1, val_fraction=0.0)
    train_quickly(out, replace(quick, rank=2, alpha=16.0))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "checkpoint.pt"}

    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:  # the last output written
        patched.setattr(finetune.Conditionals, "save", disk_full)
        with pytest.raises(FinetuneError, match="No space"):
            train_quickly(out, replace(quick, rank=4, alpha=4.0))
    # Not the new weights under the old card (which would merge at the wrong scale).
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "checkpoint.pt"} \
        == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]

    # Another method's adapter replaces the folder whole: no stale LoRA file beside it.
    train_quickly(out, replace(quick, method="speaker-adapter"))
    assert sorted(p.name for p in out.iterdir()) == [
        "card.json", "checkpoint.pt", "conds.pt", "speaker_offset.safetensors"]
    # So a folder holding anything else is refused before training, and left as it was.
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FinetuneError, match=r"holds files .*\(notes.txt\).*new or empty"):
        train_quickly(out, quick)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_full_disk_is_one_message_and_keeps_the_earlier_adapter(train_quickly, tmp_path,
                                                                   monkeypatch):
    """torch.save says RuntimeError on a full disk and safetensors SafetensorError: both
    were tracebacks (the CLI exit 1, the page "Something went wrong"), the second after the
    whole run."""
    from safetensors import SafetensorError

    out = tmp_path / "adapter"
    quick = TrainSettings(method="speaker-adapter", steps=2, batch=1, val_fraction=0.0)
    train_quickly(out, quick)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(finetune, "save_file", full)
    with pytest.raises(FinetuneError, match=r"Could not write the adapter to .*adapter "
                       r"\(Error while serializing.*\); is the disk full\? An earlier adapter "
                       r"there is left as it was"):
        train_quickly(out, replace(quick, seed=1))
    monkeypatch.undo()

    def zip_writer_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 928256")

    monkeypatch.setattr(torch, "save", zip_writer_full)
    with pytest.raises(FinetuneError, match=r"Could not write the checkpoint .*unexpected pos"):
        train_quickly(out, replace(quick, seed=2))
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    del before["checkpoint.pt"], after["checkpoint.pt"]  # each run's own, as documented
    assert after == before


def test_an_adapter_whose_tensors_do_not_fit_this_t3_is_refused_on_import(
        tiny_manager, make_manager, dataset, lora_dir, tmp_path):
    """They were listed, and failed at the voice's first use, blaming other base weights."""
    from safetensors.torch import save_file

    manager = make_manager(shipped_voices=None)
    full = tmp_path / "full"
    tiny_manager.finetune(dataset, full, TrainSettings(method="full", steps=1, batch=1,
                                                       lr=1e-4, val_fraction=0.0))
    lora_in_full = Path(shutil.copytree(full, tmp_path / "lora-in-full"))
    shutil.copyfile(lora_dir / "adapter.safetensors", lora_in_full / "t3_cfg.safetensors")
    far_layer = Path(shutil.copytree(lora_dir, tmp_path / "far-layer"))
    state = load_file(far_layer / "adapter.safetensors")
    save_file({key.replace("layers.0.", "layers.99."): value for key, value in state.items()},
              far_layer / "adapter.safetensors")
    for folder, words in ((lora_in_full, r"\(missing \[.*\]; unexpected \[.*lora_A"),
                          (far_layer, r"\(it names layers.99.self_attn.\w+, which this T3 "
                                      r"does not have as a Linear layer\)")):
        with pytest.raises(FinetuneError, match=r"does not fit the loaded T3 " + words):
            manager.add_finetuned_voice("misfit", folder)
    assert "misfit" not in manager.library.names()
    manager.add_finetuned_voice("fits", full)
    manager.add_finetuned_voice("fits too", lora_dir)


def test_importing_an_adapter_onto_a_full_cache_says_so(make_manager, lora_dir,
                                                        monkeypatch):
    """Its copy into the cache was a raw OSError (the page: "Something went wrong")."""
    import errno

    from chatterbox_demo import voices
    from chatterbox_demo.voices import VoiceError

    manager = make_manager(shipped_voices=None)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(voices.shutil, "copyfile", full)
    with pytest.raises(VoiceError, match=r"Could not save the voice library \(No space left "
                                         r"on device\); nothing was changed"):
        manager.add_finetuned_voice("tuned", lora_dir)
    assert "tuned" not in manager.library.names()


def test_an_out_folder_that_is_a_link_or_a_mount_point(train_quickly, tmp_path, monkeypatch):
    """A symlink was replaced by a real folder beside it (the adapter never reached its
    target), and a mount point (a container's volume) failed to be renamed after the
    whole run, so no adapter could ever be written there."""
    quick = TrainSettings(method="speaker-adapter", steps=1, batch=1, val_fraction=0.0)
    target = tmp_path / "elsewhere" / "adapter"
    target.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(target)
    train_quickly(link, quick)
    assert link.is_symlink() and (target / "card.json").exists()
    volume = tmp_path / "volume"
    monkeypatch.setattr(finetune.os.path, "ismount", lambda path: Path(path) == volume)
    monkeypatch.setattr(finetune, "example_loss",
                        lambda *args, **kwargs: pytest.fail("trained first"))
    with pytest.raises(FinetuneError, match=r"volume is a mount point, which cannot be "
                       r"replaced whole; give a folder inside it, such as .*volume/adapter"):
        train_quickly(volume, quick)


def test_the_speaker_adapter_trains_only_an_offset(tiny_manager, dataset, tmp_path):
    out = tmp_path / "speaker"
    card = tiny_manager.finetune(dataset, out, TrainSettings(method="speaker-adapter",
                                                             **QUICK))
    offset = load_file(out / "speaker_offset.safetensors")["speaker_emb_offset"]
    assert offset.shape == (1, 256) and offset.abs().max() > 0
    assert card["loss_history"][-1] < card["loss_history"][0]
    assert finetune.adapted_t3(tiny_manager.loaded.tts.t3, out,
                               tiny_manager.loaded.identity) is None


def test_full_fine_tuning_saves_an_upstream_t3_checkpoint(tiny_manager, dataset, tmp_path):
    # The stock decoder attaches a wrapper of T3's transformer on first use: the checkpoint
    # must leave it out.
    tiny_manager.generate("Hello.", "calm-mid", GenerationParams(max_new_tokens=4))
    assert hasattr(tiny_manager.loaded.tts.t3, "patched_model")
    out = tmp_path / "full"
    tiny_manager.finetune(dataset, out, TrainSettings(method="full", steps=4, lr=1e-3,
                                                      batch=1, gradient_checkpointing=True))
    saved = load_file(out / "t3_cfg.safetensors")
    base = tiny_manager.loaded.tts.t3
    assert set(saved) == set(checkpoint_state(base))  # the upstream layout
    assert not any(k.startswith("patched_model.") for k in saved)
    fresh = type(base)(base.hp)  # an upstream T3 as the package builds it
    fresh.load_state_dict(saved)  # strict
    assert not same_state(checkpoint_state(fresh), checkpoint_state(base))


# --- use ---------------------------------------------------------------------------------------


def test_a_fine_tuned_voice_generates_and_switching_back_is_exact(make_manager, lora_dir):
    manager = make_manager()
    params = GenerationParams(seed=3, max_new_tokens=20)
    base_state = state_of(manager.loaded.tts.t3)
    before = manager.generate("Back to the base model.", "calm-mid", params)
    voice = manager.add_finetuned_voice("tuned", lora_dir)
    assert voice.kind == "finetuned" and voice.method == "lora"
    assert "tuned" in manager.library.names()
    tuned = manager.generate("Back to the base model.", "tuned", params)
    assert tuned.speech_tokens != before.speech_tokens  # the merged adapter is in use
    assert tuned.report["voice"] == {"name": "tuned", "source": "memory", "finetuned": "lora"}
    after = manager.generate("Back to the base model.", "calm-mid", params)
    assert np.array_equal(after.wav, before.wav)
    assert same_state(base_state, state_of(manager.loaded.tts.t3))
    # Saved in the library: a new process lists it and speaks with it the same way.
    reopened = make_manager(cache_dir=manager.cache_dir)
    assert reopened.library.get("tuned").kind == "finetuned"
    again = reopened.generate("Back to the base model.", "tuned", params)
    assert np.array_equal(again.wav, tuned.wav)


def test_bench_with_a_fine_tuned_voice_builds_only_the_variants_it_runs_on(make_manager,
                                                                           lora_dir):
    """Each row built the configuration's plain T3 as well as the voice's own, which then
    pushed variants out between repeats taken in turns (and into warm-up time)."""
    from chatterbox_demo import bench

    manager = make_manager(prepare_preset=False)
    manager.add_finetuned_voice("tuned", lora_dir)
    result = bench.run(manager, ["t3-int8", "t3-bf16"], voices=["tuned"], tokens=4,
                       repeats=1, with_fidelity=False, log=lambda line: None)
    assert all("error" not in row for row in result["rows"])
    adapter = manager.adapter_of("tuned")
    assert [key[-1] for key in manager._t3_variants] == [adapter, adapter]
    assert manager.notices == []


def test_adapters_for_other_weights_or_incomplete_are_refused(make_manager, lora_dir,
                                                              tmp_path):
    manager = make_manager()
    other = tmp_path / "other"
    shutil.copytree(lora_dir, other)
    card = json.loads((other / "card.json").read_text())
    (other / "card.json").write_text(json.dumps({**card, "base_weights": "hub:someone"}))
    with pytest.raises(FinetuneError, match="trained on weights hub:someone"):
        manager.add_finetuned_voice("other", other)
    (lora_dir.parent / "partial").mkdir()
    shutil.copy(lora_dir / "card.json", lora_dir.parent / "partial" / "card.json")
    with pytest.raises(FinetuneError, match="has no adapter.safetensors"):
        manager.add_finetuned_voice("partial", lora_dir.parent / "partial")
    with pytest.raises(FinetuneError, match="not an adapter directory"):
        manager.add_finetuned_voice("none", tmp_path)
    assert manager.library.names() == make_manager().library.names()


# --- the Voices tab --------------------------------------------------------------------------


def zipped(folder, tmp_path, name):
    return shutil.make_archive(str(tmp_path / name), "zip", root_dir=folder.parent,
                               base_dir=folder.name)


def test_a_name_taken_while_the_page_trains_gets_a_number_not_the_adapter_lost(
        make_manager, dataset, make_wav, tmp_path, monkeypatch):
    """The page checks the name before training, but trains outside the model's lock, so a
    clip voice can take the name meanwhile; the adapter, trained into a temporary folder,
    was then deleted with it."""
    from chatterbox_demo import ui

    manager = make_manager(shipped_voices=None)
    monkeypatch.setattr(ui, "manager", lambda: manager)
    train = manager.finetune

    def train_while_someone_adds_the_name(*args, **kwargs):
        card = train(*args, **kwargs)
        manager.add_voice("Tuned", make_wav("other.wav", seed=3))
        return card

    monkeypatch.setattr(manager, "finetune", train_while_someone_adds_the_name)
    status, table, name = ui.finetune_voice(zipped(dataset, tmp_path, "data"), "tuned",
                                            "speaker-adapter", 4,
                                            progress=lambda *args, **kwargs: None)
    assert name == "tuned 2"
    assert "**tuned** was taken while it trained, so it is saved as **tuned 2**" in status
    rows = {row[0]: row[1] for row in table}
    assert rows["Tuned"] == "user" and rows["tuned 2"] == "fine-tuned (speaker-adapter)"
    # A long name keeps to the length limit.
    from chatterbox_demo.voices import MAX_NAME_CHARS

    long = "x" * MAX_NAME_CHARS
    manager.add_voice(long, make_wav("long.wav", seed=4))
    assert manager.library._next_free_name(long) == "x" * (MAX_NAME_CHARS - 2) + " 2"


def test_the_voices_tab_fine_tunes_from_a_zip_and_imports_an_adapter(make_manager, dataset,
                                                                     lora_dir, tmp_path,
                                                                     monkeypatch):
    import gradio as gr

    from chatterbox_demo import ui

    manager = make_manager()
    monkeypatch.setattr(ui, "manager", lambda: manager)
    quiet = lambda *args, **kwargs: None  # noqa: E731
    status, table, name = ui.finetune_voice(zipped(dataset, tmp_path, "data"), "zipped",
                                            "speaker-adapter", 4, progress=quiet)
    assert "Fine-tuned **zipped** (speaker-adapter, 4 steps" in status and name == "zipped"
    assert "taken" not in status
    assert ["zipped", "fine-tuned (speaker-adapter)"] == table[-1][:2]
    status, table = ui.import_adapter(zipped(lora_dir, tmp_path, "adapter"), "imported")
    assert "imported" in status and ["imported", "fine-tuned (lora)"] in [r[:2] for r in table]
    assert "imported" in ui.voice_choices()[1]  # removable like any user voice
    with pytest.raises(gr.Error, match="Upload a zip"):
        ui.finetune_voice(None, "x", "lora", 4, progress=quiet)
    not_zip = tmp_path / "data.zip"
    not_zip.write_bytes(b"plain text")
    with pytest.raises(gr.Error, match="not a zip file"):
        ui.import_adapter(str(not_zip), "y")
    # A dataset zip is no adapter: the message names the upload, not the server's temp path.
    with pytest.raises(gr.Error) as info:
        ui.import_adapter(zipped(dataset, tmp_path, "mixed-up"), "w")
    assert "the uploaded mixed-up.zip is not an adapter directory" in str(info.value)
    assert "/tmp" not in str(info.value) and "chatterbox-adapter-" not in str(info.value)
    import zipfile

    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as evil:
        evil.writestr("../outside.txt", "escape")
    with pytest.raises(gr.Error, match="points outside the archive"):
        ui.finetune_voice(str(tmp_path / "evil.zip"), "z", "lora", 4, progress=quiet)
    assert not (tmp_path / "outside.txt").exists()
    # A zip without one usable clip: named as the upload, not as the server's temp folder.
    no_clips = tmp_path / "notes"
    no_clips.mkdir()
    (no_clips / "readme.md").write_text("nothing to hear")
    with pytest.raises(gr.Error) as info:
        ui.finetune_voice(zipped(no_clips, tmp_path, "notes"), "v", "lora", 4, progress=quiet)
    assert "the uploaded notes.zip" in str(info.value)
    assert "chatterbox-finetune-" not in str(info.value)


def test_the_cli_goes_from_clips_to_a_voice(dataset, tmp_path):
    import os
    import subprocess
    import sys

    from app_server import ROOT

    env = {**os.environ, "CHATTERBOX_DEMO_CACHE": str(tmp_path / "cache")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "chatterbox_demo", *args,
                               "--weights", "tiny"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)

    folder = tmp_path / "clips"
    shutil.copytree(dataset, folder, ignore=shutil.ignore_patterns(".chatterbox*"))
    (folder / "extra.txt").write_text("Nothing to hear.")
    prepared = cli("finetune", "prepare", str(folder))
    assert prepared.returncode == 0, prepared.stderr
    assert "8 clips usable" in prepared.stdout and "extra.txt: no audio" in prepared.stdout
    trained = cli("finetune", "train", str(folder), "--out", str(tmp_path / "adapter"),
                  "--steps", "3", "--batch", "1", "--target", "q,v", "--name", "cli voice")
    assert trained.returncode == 0, trained.stderr
    assert "lora, 3 steps" in trained.stdout and "added voice 'cli voice'" in trained.stdout
    assert "fine-tuning" in trained.stderr  # the progress bar
    listed = cli("voices", "list")
    assert "cli voice" in listed.stdout and "finetuned" in listed.stdout
    bad = cli("finetune", "train", str(folder), "--out", str(tmp_path / "x"), "--rank", "0")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: rank")
    missing = cli("finetune", "prepare", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "is not a folder" in missing.stderr
