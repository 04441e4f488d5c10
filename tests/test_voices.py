import hashlib
import json
import pathlib
import shutil
import threading
import unicodedata
from pathlib import Path

import pytest
import torch
from chatterbox.tts import Conditionals
from conftest import SHIPPED, VOICES_DIR

from chatterbox_demo.voices import (
    BUILTIN_NAME,
    MAX_NAME_CHARS,
    VoiceError,
    VoiceLibrary,
    check_name,
    name_key,
)


@pytest.fixture
def compute(tiny_manager):
    """The manager's real conditionals computation, counting its calls."""

    def counting(path, exaggeration):
        counting.calls.append((Path(path).name, exaggeration))
        return tiny_manager._compute_conditionals(path, exaggeration)

    counting.calls = []
    return counting


@pytest.fixture
def make_library(tiny_manager, compute, tmp_path):
    def factory(cache_dir: Path | None = None, shipped: bool = False,
                copy_shipped_conds: bool = True) -> VoiceLibrary:
        cache_dir = cache_dir or tmp_path / "cache"
        if shipped and copy_shipped_conds and not (cache_dir / "conds").exists():
            # The session has computed these already; copying saves the recomputation.
            shutil.copytree(tiny_manager.cache_dir / "conds", cache_dir / "conds")
        library = VoiceLibrary(cache_dir, tiny_manager.loaded.identity, compute, "cpu")
        if shipped:
            library.register_shipped(VOICES_DIR)
        return library

    return factory


@pytest.fixture
def clip(make_wav):
    return make_wav("ann.wav", seconds=2.0, sample_rate=16000, seed=1)


def snapshot(library: VoiceLibrary):
    """Everything a refused call must leave alone: the listing, the index file's bytes and
    the stored audio copies."""
    listing = [(v.name, v.kind, v.sha256, v.exaggeration, v.audio) for v in library.list()]
    index = library.index_path.read_bytes() if library.index_path.exists() else None
    audio = sorted(p.name for p in library.audio_dir.iterdir()) \
        if library.audio_dir.exists() else []
    return listing, index, audio


def index_entries(library):
    return json.loads(library.index_path.read_text())["voices"]


def _equal_conds(a: Conditionals, b: Conditionals) -> bool:
    pairs = [(a.t3.speaker_emb, b.t3.speaker_emb),
             (a.t3.cond_prompt_speech_tokens, b.t3.cond_prompt_speech_tokens)]
    pairs += [(a.gen[k], b.gen[k]) for k in a.gen if torch.is_tensor(a.gen[k])]
    return a.gen.keys() == b.gen.keys() and all(torch.equal(x.cpu(), y.cpu()) for x, y in pairs)


# --- add / list / rename / remove -----------------------------------------------------------


def test_add_list_rename_remove(make_library, clip, compute):
    library = make_library(shipped=True)
    assert compute.calls == []  # shipped conditionals came from the copied cache
    voice = library.add("Ann", clip, exaggeration=0.7)
    assert (voice.name, voice.kind, voice.exaggeration) == ("Ann", "user", 0.7)
    assert voice.sha256 == hashlib.sha256(clip.read_bytes()).hexdigest()
    assert voice.seconds == 2.0
    stored = Path(voice.audio)
    assert stored == library.audio_dir / f"{voice.sha256}.wav"
    assert stored.read_bytes() == clip.read_bytes()
    assert compute.calls == [(stored.name, 0.7)]  # conditionals made once, at add time

    assert library.names() == [*SHIPPED, "Ann"]  # shipped first, then user voices
    assert library.get("ann") == voice == library.get("ANN")
    entries = index_entries(library)
    assert entries == [{"name": "Ann", "exaggeration": 0.7, "sha256": voice.sha256,
                        "audio": str(stored), "seconds": 2.0}]
    assert json.loads(library.index_path.read_text())["version"] == 1

    renamed = library.rename("ann", "Bea")
    assert renamed.name == "Bea" and renamed.sha256 == voice.sha256
    assert library.names() == [*SHIPPED, "Bea"]
    with pytest.raises(VoiceError, match="Unknown voice 'Ann'; available: .*Bea"):
        library.get("Ann")
    assert library.rename("bea", "BEA").name == "BEA"  # a case-only change of its own name
    assert [e["name"] for e in index_entries(library)] == ["BEA"]

    # A new process sees the same library.
    again = make_library(shipped=True)
    assert [(v.name, v.kind) for v in again.list()] == [
        *((name, "shipped") for name in SHIPPED), ("BEA", "user")]

    removed = library.remove("bea")
    assert removed.name == "BEA"
    assert library.names() == list(SHIPPED)
    assert index_entries(library) == []
    assert stored.exists()  # kept: re-adding the clip later is instant
    with pytest.raises(VoiceError, match="Unknown voice"):
        library.remove("BEA")
    calls = len(compute.calls)
    library.add("Ann again", clip)
    assert len(compute.calls) == calls  # same content: its conditionals are reused


def test_added_voice_survives_deletion_of_the_upload(make_library, clip, compute):
    library = make_library()
    voice = library.add("temp upload", clip)
    clip.unlink()  # Gradio deletes its temporary upload files
    conds, source = library.conditionals(voice)
    assert source == "memory" and conds is not None
    fresh = make_library()
    conds, source = fresh.conditionals(fresh.get("temp upload"), cached=False)
    assert source == "computed" and compute.calls[-1][0] == Path(voice.audio).name


def test_list_orders_kinds_then_names(make_library, make_wav):
    library = make_library(shipped=True)
    for name, seed in (("zed", 1), ("Alpha", 2), ("mike", 3)):
        library.add(name, make_wav(f"{name}.wav", seed=seed))
    assert library.names() == [*SHIPPED, "Alpha", "mike", "zed"]


# --- shipped and built-in voices ------------------------------------------------------------


def test_shipped_voices(make_library, compute):
    library = make_library(shipped=True, copy_shipped_conds=False)
    voices = library.list()
    assert [(v.name, v.kind) for v in voices] == [(name, "shipped") for name in SHIPPED]
    for voice in voices:
        path = VOICES_DIR / f"{voice.name}.wav"
        assert voice.audio == str(path)
        assert voice.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert 1.0 <= voice.seconds <= 10.0
        assert (library.conds_dir / f"{voice.sha256}.pt").is_file()  # precomputed
    assert sorted(name for name, _ in compute.calls) == sorted(f"{n}.wav" for n in SHIPPED)
    assert not library.index_path.exists()  # shipped voices are not written to the index

    before = snapshot(library)
    for name in SHIPPED:
        with pytest.raises(VoiceError, match="ships with the app and cannot be removed"):
            library.remove(name)
        with pytest.raises(VoiceError, match="ships with the app and cannot be renamed"):
            library.rename(name.upper(), "mine now")
        assert snapshot(library) == before

    # Registered again on the same cache: nothing recomputed.
    calls = len(compute.calls)
    make_library(shipped=True, copy_shipped_conds=False)
    assert len(compute.calls) == calls


def test_builtin_voice(make_library, tiny_manager, ref_wav):
    library = make_library(shipped=True)
    library.register_builtin(None)  # weights without conds.pt: no built-in voice
    assert BUILTIN_NAME not in library.names()
    conds = tiny_manager._compute_conditionals(ref_wav, 0.3)
    library.register_builtin(conds)
    voice = library.list()[0]
    assert (voice.name, voice.kind, voice.sha256) == (BUILTIN_NAME, "builtin", None)
    assert voice.exaggeration == pytest.approx(0.3)
    got, source = library.conditionals(voice)
    assert got is conds and source == "memory"
    before = snapshot(library)
    with pytest.raises(VoiceError, match="ships with the weights and cannot be removed"):
        library.remove("Builtin")
    with pytest.raises(VoiceError, match="'BUILTIN' is reserved .* choose another name"):
        library.add("BUILTIN", ref_wav)
    assert snapshot(library) == before


def test_the_builtin_name_is_reserved_even_without_a_builtin_voice(make_library, clip):
    # Weights without conds.pt have no built-in voice; weights with one, loaded later on
    # the same cache, would hide (and the next save drop) a user voice of that name.
    library = make_library()
    library.register_builtin(None)
    with pytest.raises(VoiceError, match="reserved for the voice that ships with the weights"):
        library.add("Builtin", clip)
    library.add("Ann", clip)
    with pytest.raises(VoiceError, match="choose another name"):
        library.rename("Ann", "builtin")
    assert library.names() == ["Ann"]


def test_a_user_voice_named_builtin_in_an_old_index_is_renamed_not_lost(
        make_library, clip, make_wav, tiny_manager, ref_wav, caplog):
    old = make_library()
    old.add("Ann", clip)
    entries = index_entries(old)
    entries.append({**entries[0], "name": "Builtin"})  # as an older version could save it
    old.index_path.write_text(json.dumps({"version": 1, "voices": entries}))

    library = make_library()
    assert "'Builtin'" in caplog.text and "'Builtin 2'" in caplog.text
    library.register_builtin(tiny_manager._compute_conditionals(ref_wav, 0.5))
    assert [(v.name, v.kind) for v in library.list()] == [
        (BUILTIN_NAME, "builtin"), ("Ann", "user"), ("Builtin 2", "user")]
    assert library.get("Builtin 2").sha256 == entries[0]["sha256"]
    library.add("Other", make_wav("other.wav", seed=5))
    assert [e["name"] for e in index_entries(library)] == ["Ann", "Builtin 2", "Other"]


def test_two_libraries_on_one_cache_keep_each_others_changes(make_library, clip, make_wav):
    # The app and `voices add` run in a shell: two processes, each with its own library
    # read at its start, on one cache.
    app, cli = make_library(), make_library()
    app.add("Alice", clip)
    cli.add("Bob", make_wav("bob.wav", seed=2))
    assert make_library().names() == ["Alice", "Bob"]
    app.rename("Alice", "Alice2")
    assert make_library().names() == ["Alice2", "Bob"]
    assert app.names() == ["Alice2", "Bob"]  # the app's own list caught up too
    cli.remove("Alice2")  # a voice the shell's library never saw
    assert make_library().names() == ["Bob"]
    with pytest.raises(VoiceError, match="'Bob' exists"):
        app.add("bob", make_wav("bob2.wav", seed=3))
    with pytest.raises(VoiceError, match="Unknown voice 'Alice2'"):
        app.rename("Alice2", "Carol")
    assert make_library().names() == ["Bob"]


def test_a_library_lists_what_another_process_added_without_a_change_of_its_own(
        make_library, clip):
    app, cli = make_library(), make_library()
    assert app.names() == []
    cli.add("Bob", clip)
    assert app.names() == ["Bob"] and app.get("bob").name == "Bob"
    cli.remove("Bob")
    assert app.names() == []


def test_a_list_read_while_this_library_removes_a_voice_does_not_bring_it_back(
        make_library, clip, make_wav, monkeypatch):
    """Lists no longer wait for the model's lock (a generation holds it throughout). A
    list that had read the index just before a removal here put the old list back after
    it, with the new index's stamp: the removed voice was listed until the next change."""
    app, cli = make_library(), make_library()
    app.add("Alice", clip)
    cli.add("Bob", make_wav("bob.wav", seed=2))  # app's memory is behind its index now
    read, go, real_read = threading.Event(), threading.Event(), VoiceLibrary._read_index
    listing = threading.Thread(target=app.list)

    def slow_read(library):  # the list pauses between reading the index and using it
        voices = real_read(library)
        if threading.current_thread() is listing:
            read.set()
            go.wait(10)
        return voices

    monkeypatch.setattr(VoiceLibrary, "_read_index", slow_read)
    listing.start()
    assert read.wait(10)
    removing = threading.Thread(target=app.remove, args=("Alice",))
    removing.start()
    removing.join(0.5)  # done by now, unless it waits for the list
    go.set()
    listing.join(10)
    removing.join(10)
    assert app.names() == ["Bob"] and make_library().names() == ["Bob"]


# --- refused names --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first,second",
    [
        ("Ann", "ANN"),
        ("Ann", "ann"),
        ("Ann", "  ann  "),
        ("Café", "Cafe\u0301"),  # NFC vs NFD
        ("CAFÉ", "cafe\u0301"),
        ("fish", "\ufb01sh"),  # the "fi" ligature: NFKC
        ("Straße", "STRASSE"),  # casefold
        ("Ⅻ", "XII"),  # roman numeral: NFKC
    ],
)
def test_duplicate_names_are_refused(make_library, make_wav, first, second):
    library = make_library()
    library.add(first, make_wav("one.wav", seed=1))
    before = snapshot(library)
    with pytest.raises(VoiceError) as info:
        library.add(second, make_wav("two.wav", seed=2))
    assert f"A voice named {unicodedata.normalize('NFC', first)!r} exists" in str(info.value)
    assert snapshot(library) == before
    assert name_key(first) == name_key(check_name(second))


def test_duplicates_of_shipped_names_and_renames_onto_others_are_refused(make_library, clip,
                                                                         make_wav):
    library = make_library(shipped=True)
    library.add("Ann", clip)
    library.add("Bob", make_wav("bob.wav", seed=5))
    before = snapshot(library)
    with pytest.raises(VoiceError, match="'calm-mid' exists"):
        library.add("CALM-MID", make_wav("x.wav", seed=6))
    with pytest.raises(VoiceError, match="'Bob' exists"):
        library.rename("Ann", "bob")
    with pytest.raises(VoiceError, match="'narrator-low' exists"):
        library.rename("Ann", "Narrator-Low")
    assert snapshot(library) == before


BAD_NAMES = [
    pytest.param("", "Give the voice a name", id="empty"),
    pytest.param("   ", "Give the voice a name", id="spaces"),
    pytest.param("\t\n ", "Give the voice a name", id="whitespace"),
    pytest.param(None, "Give the voice a name", id="none"),
    pytest.param(42, "Give the voice a name", id="not-a-string"),
    pytest.param("x" * (MAX_NAME_CHARS + 1), "limited to 64 characters", id="65-chars"),
    pytest.param("../x", "looks like a path", id="dotdot"),
    pytest.param("/abs", "looks like a path", id="absolute"),
    pytest.param("a/b", "looks like a path", id="slash"),
    pytest.param("a\\b", "looks like a path", id="backslash"),
    pytest.param(".hidden", "looks like a path", id="dotfile"),
    pytest.param("..", "looks like a path", id="dotdot-only"),
    pytest.param("a\x00b", "control characters", id="nul"),
    pytest.param("red\x1b[31m", "control characters", id="escape"),
    pytest.param("two\nlines", "control characters", id="newline"),
    pytest.param("del\x7f", "control characters", id="del"),
    pytest.param("zero\u200bwidth", "control characters", id="zero-width"),
    pytest.param("bidi\u202eevil", "control characters", id="bidi-override"),
]


@pytest.mark.parametrize("name,words", BAD_NAMES)
def test_bad_names_are_refused_and_change_nothing(make_library, clip, name, words):
    library = make_library(shipped=True)
    library.add("keeper", clip)
    before = snapshot(library)
    with pytest.raises(VoiceError, match=words):
        library.add(name, clip)
    assert snapshot(library) == before
    with pytest.raises(VoiceError, match=words):
        library.rename("keeper", name)
    assert snapshot(library) == before


def test_name_length_limit_and_trimming(make_library, clip):
    library = make_library()
    assert library.add("x" * MAX_NAME_CHARS, clip).name == "x" * MAX_NAME_CHARS
    assert library.add("  Padded Name  ", clip).name == "Padded Name"
    assert library.add("Ann 2 (café)", clip).name == "Ann 2 (café)"
    assert check_name("Cafe\u0301") == "Café"  # stored in NFC


# --- refused audio and settings -------------------------------------------------------------


def _bad_audio(tmp_path, make_wav, kind):
    if kind == "missing":
        return tmp_path / "missing.wav"
    if kind == "none":
        return None
    if kind == "empty":
        (tmp_path / "empty.wav").write_bytes(b"")
        return tmp_path / "empty.wav"
    if kind == "text":
        (tmp_path / "notes.wav").write_text("not audio\n" * 50)
        return tmp_path / "notes.wav"
    if kind == "silent":
        return make_wav("silent.wav", kind="silence")
    if kind == "short":
        return make_wav("short.wav", seconds=0.4)
    raise ValueError(kind)


@pytest.mark.parametrize(
    "kind,words",
    [("missing", "does not exist"), ("none", "No audio file given"), ("empty", "is empty"),
     ("text", "not a readable audio file"), ("silent", "is silent"),
     ("short", "at least 1 s")],
)
def test_bad_audio_is_refused_and_changes_nothing(make_library, make_wav, clip, tmp_path,
                                                  compute, kind, words):
    library = make_library(shipped=True)
    library.add("keeper", clip)
    before, calls = snapshot(library), len(compute.calls)
    with pytest.raises(VoiceError, match=words):
        library.add("new voice", _bad_audio(tmp_path, make_wav, kind))
    assert snapshot(library) == before
    assert len(compute.calls) == calls


@pytest.mark.parametrize("value", [-0.1, 2.5, float("nan"), "loud", None])
def test_bad_exaggeration_is_refused(make_library, clip, compute, value):
    library = make_library()
    before = snapshot(library)
    with pytest.raises(ValueError, match="exaggeration must be"):
        library.add("Ann", clip, exaggeration=value)
    assert snapshot(library) == before and compute.calls == []


def test_failed_index_write_changes_nothing(make_library, clip, make_wav, monkeypatch):
    library = make_library()
    library.add("keeper", clip)
    before = snapshot(library)
    real_write_text = pathlib.Path.write_text

    def disk_full(self, *args, **kwargs):
        if self.name.startswith(".voices.json.tmp"):
            raise OSError(28, "No space left on device")
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    with pytest.raises(VoiceError, match="No space left on device.*nothing was changed"):
        library.rename("keeper", "renamed")
    with pytest.raises(VoiceError, match="nothing was changed"):
        library.remove("keeper")
    assert snapshot(library) == before


def test_a_file_that_cannot_be_moved_aside_is_left_and_the_library_goes_on(
        make_library, clip, compute, monkeypatch):
    # Another process moved it first, or the cache is read-only.
    library = make_library()
    voice = library.add("Ann", clip)
    (library.conds_dir / f"{voice.sha256}.pt").write_bytes(b"garbage")
    library.index_path.write_text("{ not json")

    def already_gone(src, dst):
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr("chatterbox_demo.voices.os.replace", already_gone)
    fresh = make_library()
    assert fresh.names() == []
    _, source = fresh.conditionals_for_file(clip, 0.5)
    assert source == "computed"


@pytest.mark.parametrize("broken", [
    "{ this is not json",
    '{"version": 1, "voices": [{"name": "no hash or settings"}]}',
    '{"version": 1}',
])
def test_corrupt_index_is_moved_aside(make_library, clip, broken):
    library = make_library()
    library.add("Ann", clip)
    library.index_path.write_text(broken)
    fresh = make_library()
    assert fresh.names() == []
    assert (fresh.cache_dir / "voices.json.corrupt").read_text() == broken
    fresh.add("Ann", clip)  # and the library works again
    assert [e["name"] for e in index_entries(fresh)] == ["Ann"]


def test_an_index_that_cannot_be_read_now_is_left_as_it_is(make_library, clip, monkeypatch):
    """Out of file handles, say: the index was taken for damaged and moved aside, and every
    process then listed, and saved, no user voices."""
    library = make_library()
    library.add("Ann", clip)
    index = library.index_path.read_bytes()
    real_read_text = pathlib.Path.read_text

    def no_handles(self, *args, **kwargs):
        if self.name == "voices.json":
            raise OSError(24, "Too many open files")
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", no_handles)
    other = make_library()  # another process starting now
    assert other.names() == []
    library.index_path.touch()  # a change by another process: the first one looks again
    assert library.names() == ["Ann"]  # and keeps the list it had
    with pytest.raises(VoiceError, match="Could not read the voice index.*nothing was changed"):
        other.add("Bob", clip)
    assert library.index_path.read_bytes() == index
    assert not list(library.cache_dir.glob("voices.json.corrupt*"))
    monkeypatch.undo()
    assert other.names() == ["Ann"]  # read once it can be


def test_a_second_corrupt_index_does_not_overwrite_the_first(make_library, clip):
    library = make_library()
    library.index_path.parent.mkdir(parents=True, exist_ok=True)
    library.index_path.write_text("{ first")
    make_library()
    library.index_path.write_text("{ second")
    make_library()
    assert (library.cache_dir / "voices.json.corrupt").read_text() == "{ first"
    assert (library.cache_dir / "voices.json.corrupt.2").read_text() == "{ second"


def test_a_damaged_stored_clip_is_named_and_adding_it_again_mends_it(make_library, clip):
    """The clip's copy in the cache cut short, its conditionals lost: computing from it
    failed with a torch traceback, and adding the clip again reused the damaged copy."""
    library = make_library()
    voice = library.add("Ann", clip)
    stored = Path(voice.audio)
    stored.write_bytes(stored.read_bytes()[:44])
    (library.conds_dir / f"{voice.sha256}.pt").unlink()
    fresh = make_library()
    with pytest.raises(VoiceError, match="stored audio .* is damaged; remove the voice and "
                                         "add its clip again"):
        fresh.conditionals(fresh.get("Ann"))
    fresh.remove("Ann")
    again = fresh.add("Ann", clip)
    assert Path(again.audio).read_bytes() == Path(clip).read_bytes()
    assert fresh.conditionals(again)[1] == "memory"


def test_a_clip_that_cannot_be_stored_says_so_and_changes_nothing(make_library, clip,
                                                                  monkeypatch):
    library = make_library()
    before = snapshot(library)

    def read_only(path, write):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr("chatterbox_demo.voices.write_atomically", read_only)
    with pytest.raises(VoiceError, match="Could not save the voice library \\(Read-only file "
                                         "system\\); nothing was changed"):
        library.add("Ann", clip)
    assert snapshot(library) == before


# --- the conditionals cache -----------------------------------------------------------------


def test_conditionals_computed_then_memory_then_disk(make_library, make_wav, compute,
                                                      monkeypatch):
    library = make_library()
    path = make_wav("adhoc.wav", seed=9)
    first, source = library.conditionals_for_file(path, 0.5)
    assert source == "computed" and len(compute.calls) == 1
    second, source = library.conditionals_for_file(path, 0.5)
    assert source == "memory" and second is first and len(compute.calls) == 1

    # A new library (a new process) on the same cache reads the file and computes nothing;
    # every read of the cache is tensors-only.
    loads = []
    real_load = torch.load

    def spy_load(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy_load)
    fresh = make_library()
    from_disk, source = fresh.conditionals_for_file(path, 0.5)
    assert source == "disk" and len(compute.calls) == 1
    assert loads == [True]
    assert _equal_conds(from_disk, first)
    assert fresh.conditionals_for_file(path, 0.5)[1] == "memory"

    # cached=False is upstream's behaviour: recompute on every call.
    assert fresh.conditionals_for_file(path, 0.5, cached=False)[1] == "computed"
    assert fresh.conditionals_for_file(path, 0.5, cached=False)[1] == "computed"
    assert len(compute.calls) == 3


def test_library_voice_from_disk_in_a_new_library(make_library, clip, compute):
    library = make_library()
    voice = library.add("Ann", clip)
    assert library.conditionals(voice)[1] == "memory"
    assert len(compute.calls) == 1
    fresh = make_library()
    conds, source = fresh.conditionals(fresh.get("ann"))
    assert source == "disk" and len(compute.calls) == 1
    assert _equal_conds(conds, library.conditionals(voice)[0])
    assert fresh.conditionals(fresh.get("ann"), cached=False)[1] == "computed"
    assert len(compute.calls) == 2


def test_cache_is_per_weights(tiny_manager, clip, compute, tmp_path):
    one = VoiceLibrary(tmp_path, tiny_manager.loaded.identity, compute)
    one.add("Ann", clip)
    other = VoiceLibrary(tmp_path, "some other weights", compute)
    assert other.conds_dir != one.conds_dir
    assert other.conditionals(other.get("Ann"))[1] == "computed"  # never another model's


def test_missing_source_audio_and_cache(make_library, clip):
    library = make_library()
    voice = library.add("Ann", clip)
    Path(voice.audio).unlink()
    (library.conds_dir / f"{voice.sha256}.pt").unlink()
    fresh = make_library()
    with pytest.raises(VoiceError, match="source audio .* is gone; add it again"):
        fresh.conditionals(fresh.get("Ann"))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_cache_file_is_moved_aside_and_recomputed(make_library, clip, compute, damage):
    library = make_library()
    voice = library.add("Ann", clip)
    cache_file = library.conds_dir / f"{voice.sha256}.pt"
    good = cache_file.read_bytes()
    bad = {"garbage": b"\x00not a torch file\xff" * 10, "truncated": good[: len(good) // 2],
           "empty": b""}[damage]
    cache_file.write_bytes(bad)

    fresh = make_library()
    conds, source = fresh.conditionals(fresh.get("Ann"))
    assert source == "computed" and len(compute.calls) == 2
    aside = cache_file.with_name(cache_file.name + ".corrupt")
    assert aside.read_bytes() == bad
    assert Conditionals.load(cache_file) is not None  # rewritten and readable
    assert _equal_conds(conds, library.conditionals(voice)[0])
    assert make_library().conditionals(voice)[1] == "disk"


class _Payload:
    """Unpickling this calls open(marker, "w"): code execution, creating the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_cache_files_are_never_unpickled_with_code(make_library, clip, compute, tmp_path):
    # The payload is live: a plain (weights_only=False) load runs it.
    control = tmp_path / "control-marker"
    torch.save({"t3": _Payload(control), "gen": {}}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()

    library = make_library()
    voice = library.add("Ann", clip)
    marker = tmp_path / "pwned-marker"
    cache_file = library.conds_dir / f"{voice.sha256}.pt"
    torch.save({"t3": _Payload(marker), "gen": {}}, cache_file)

    fresh = make_library()
    conds, source = fresh.conditionals(fresh.get("Ann"))
    assert not marker.exists(), "a cache file's pickled code was executed"
    assert source == "computed" and len(compute.calls) == 2
    assert cache_file.with_name(cache_file.name + ".corrupt").exists()
    assert isinstance(conds, Conditionals)


# --- fine-tuned voices ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tiny_manager, tmp_path_factory):
    """A LoRA and a speaker-adapter directory, each trained for one step on the tiny model."""
    from chatterbox_demo.finetune import TrainSettings
    from chatterbox_demo.speaker_data import make_espeak_dataset

    root = tmp_path_factory.mktemp("adapters")
    data = make_espeak_dataset(root / "data", 2)
    made = {}
    for method in ("lora", "speaker-adapter"):
        made[method] = root / method
        tiny_manager.finetune(data, made[method], TrainSettings(method=method, steps=1,
                                                                batch=1, val_fraction=0.0))
    return made


def cut_short(path: Path) -> bytes:
    """Cut ``path`` to half its length, as a failed copy or download would; returns the
    whole content."""
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return whole


def test_a_damaged_adapter_is_refused_at_import_and_named_when_used(make_manager, adapters,
                                                                     tmp_path):
    from chatterbox_demo.config import GenerationParams
    from chatterbox_demo.finetune import FinetuneError

    manager = make_manager(shipped_voices=None)
    broken = tmp_path / "broken"
    shutil.copytree(adapters["lora"], broken)
    cut_short(broken / "adapter.safetensors")
    with pytest.raises(FinetuneError, match=r"broken/adapter.safetensors is damaged .*"
                                            r"MetadataIncompleteBuffer.*import a whole copy"):
        manager.add_finetuned_voice("broken", broken)
    # Whole, but another method's file under this method's name.
    shutil.copy(adapters["speaker-adapter"] / "speaker_offset.safetensors",
                broken / "adapter.safetensors")
    with pytest.raises(FinetuneError, match="does not hold a lora adapter's weights "
                                            r"\(speaker_emb_offset is not"):
        manager.add_finetuned_voice("broken", broken)
    assert "broken" not in manager.library.names()

    # Damaged in the cache after the import: a new process says so, not a traceback...
    voice = manager.add_finetuned_voice("tuned", adapters["lora"])
    stored = Path(voice.adapter) / "adapter.safetensors"
    whole = cut_short(stored)
    params = GenerationParams(max_new_tokens=4, seed=0)
    fresh = make_manager(cache_dir=manager.cache_dir, shipped_voices=None)
    with pytest.raises(FinetuneError, match="adapter.safetensors is damaged"):
        fresh.generate("Hello there.", "tuned", params)
    # ... and importing the adapter again mends the stored copy.
    fresh.add_finetuned_voice("tuned again", adapters["lora"])
    assert stored.read_bytes() == whole
    assert len(fresh.generate("Hello there.", "tuned", params).wav) > 0


def test_a_speaker_adapter_voice_is_refused_on_other_weights(make_manager, adapters,
                                                             tiny_manager, monkeypatch):
    import dataclasses

    from chatterbox_demo import weights
    from chatterbox_demo.config import GenerationParams
    from chatterbox_demo.finetune import FinetuneError

    manager = make_manager(shipped_voices=None)
    manager.add_finetuned_voice("tuned", adapters["speaker-adapter"])
    other = dataclasses.replace(tiny_manager.loaded, identity="tiny:other weights")
    monkeypatch.setattr(weights, "load", lambda spec, device, seed=0: other)
    reopened = make_manager(cache_dir=manager.cache_dir, shipped_voices=None)
    assert reopened.library.get("tuned").method == "speaker-adapter"
    # Its offset is baked into its conditionals, which only fit the weights it was trained on.
    with pytest.raises(FinetuneError, match="trained on weights tiny:seed=0.*not the loaded "
                                            "tiny:other weights; train it again"):
        reopened.generate("Hello there.", "tuned", GenerationParams(max_new_tokens=4))


def test_the_voices_tab_refuses_a_taken_name_before_fine_tuning(make_manager, make_wav,
                                                                tmp_path, monkeypatch):
    import zipfile

    import gradio as gr

    from chatterbox_demo import ui

    manager = make_manager()
    manager.add_voice("Ann", make_wav("ann.wav", seed=1))
    monkeypatch.setattr(ui, "manager", lambda: manager)
    monkeypatch.setattr(manager, "finetune", lambda *args, **kwargs: pytest.fail("trained"))
    upload = tmp_path / "data.zip"
    with zipfile.ZipFile(upload, "w") as archive:
        archive.writestr("data/metadata.csv", "a|Hello there.\n")
    quiet = lambda *args, **kwargs: None  # noqa: E731
    with pytest.raises(gr.Error, match="A voice named 'calm-mid' exists; it ships with the "
                                       "app; choose another name"):
        ui.finetune_voice(str(upload), "Calm-Mid", "lora", 4, progress=quiet)
    with pytest.raises(gr.Error, match="A voice named 'Ann' exists; choose another name or "
                                       "remove that one first"):
        ui.finetune_voice(str(upload), "ann", "lora", 4, progress=quiet)
    # It cannot be cancelled: a million steps held the fine-tune slot for days.
    with pytest.raises(gr.Error, match="The page trains up to 2000 steps .asked for 2001.; "
                                       "use `python -m chatterbox_demo finetune train`"):
        ui.finetune_voice(str(upload), "new", "lora", 2001, progress=quiet)
    # The page's box lets that refusal through: Gradio's own bound check said "Value 5000
    # is greater than maximum value 2000." without naming the box or the way to go on.
    steps = next(block for block in ui.build_demo().blocks.values()
                 if getattr(block, "label", None) == "steps (up to 2000 here)")
    assert steps.preprocess(5000) == 5000
    with pytest.raises(gr.Error, match="steps must be at least 1 .got 0"):
        steps.preprocess(0)


def test_adapter_weights_that_do_not_fit_this_t3_are_refused_when_loaded(make_manager,
                                                                         adapters, tmp_path):
    from safetensors.torch import load_file, save_file

    from chatterbox_demo import finetune
    from chatterbox_demo.finetune import FinetuneError

    # Whole pairs of the card's rank, but for a wider layer than this T3 has: refused when
    # imported, from the file's header and this T3's layers.
    manager = make_manager(shipped_voices=None)
    wide = tmp_path / "wide"
    shutil.copytree(adapters["lora"], wide)
    state = load_file(wide / "adapter.safetensors")
    key = next(k for k in state if k.endswith(".lora_B"))
    state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    save_file(state, wide / "adapter.safetensors")
    with pytest.raises(FinetuneError, match=r"does not fit the loaded T3 \(its .* is for a "
                                            r"1025 x 1024 layer, this T3's is 1024 x 1024\)"):
        manager.add_finetuned_voice("wide", wide)
    assert "wide" not in manager.library.names()
    # And when merged, should a stored copy change after it was imported.
    identity = manager.loaded.identity
    with pytest.raises(FinetuneError, match=r"does not fit the loaded T3 \(its .* is for a "
                                            r"1025 x 1024 layer, this T3's is 1024 x 1024\)"):
        finetune.adapted_t3(manager.loaded.tts.t3, wide, identity)


def test_names_on_disk_list_what_the_library_lists(tmp_path):
    """What the command line checks a --voice against before loading a model."""
    import json

    from chatterbox_demo.voices import names_on_disk

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for stem in ("calm", "bright"):
        (shipped / f"{stem}.wav").write_bytes(b"")
    cache = tmp_path / "cache"
    cache.mkdir()
    assert names_on_disk(cache, shipped) == ["bright", "calm"]
    entry = {"exaggeration": 0.5, "sha256": "0" * 64, "source": "x", "seconds": 1.0}
    index = {"version": 1, "voices": [{"name": "Zed", "kind": "user", **entry},
                                      {"name": "Tuned", "kind": "finetuned", **entry},
                                      {"name": "CALM", "kind": "user", **entry}]}
    (cache / "voices.json").write_text(json.dumps(index))
    # A user voice hides the shipped one of its name; shipped, user, fine-tuned in turn.
    assert names_on_disk(cache, shipped) == ["bright", "CALM", "Zed", "Tuned"]
    (cache / "voices.json").write_text("{not json")
    assert names_on_disk(cache, shipped) is None  # the library decides (and moves it aside)
    assert (cache / "voices.json").read_text() == "{not json"  # untouched here
