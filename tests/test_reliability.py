"""Faults: running out of memory while building a variant, and a configuration switch
asked for while another user is generating."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import dead_pid

from chatterbox_demo import manager as manager_module
from chatterbox_demo.config import GenerationParams

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("error", [MemoryError(), manager_module.MEMORY_ERRORS[1]("CUDA OOM")])
def test_out_of_memory_while_building_keeps_the_previous_configuration(tiny_manager,
                                                                       monkeypatch, error):
    before = (tiny_manager.preset, tiny_manager.config)
    built = dict(tiny_manager._t3_variants)

    def no_memory(pristine, config):
        raise error

    monkeypatch.setattr(manager_module, "build_t3", no_memory)
    with pytest.raises(manager_module.OutOfMemory, match="Not enough memory.*staying on cached"):
        tiny_manager.apply_preset("t3-bf16")
    assert (tiny_manager.preset, tiny_manager.config) == before
    assert dict(tiny_manager._t3_variants) == built
    assert "Not enough memory" in tiny_manager.notices[-1]
    # The model still generates on the configuration it had.
    result = tiny_manager.generate("Still here.", "calm-mid", GenerationParams(max_new_tokens=8))
    assert result.report["preset"] == "cached"


@pytest.mark.parametrize(("preset", "where"), [
    ("t3-int8", "prepare_decoder"),  # recording the fast decoder's traced step
    ("compiled", "_warm_up"),  # a compiled preset's warm-up generation
])
def test_out_of_memory_after_building_keeps_the_previous_configuration(tiny_manager,
                                                                      monkeypatch, preset,
                                                                      where):
    """Memory running out once the variants were built reached the caller as a raw
    RuntimeError, with no notice, and left the failed configuration's variants cached."""
    before = (tiny_manager.preset, tiny_manager.config)
    built = (dict(tiny_manager._t3_variants), dict(tiny_manager._s3gen_variants))

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")

    owner = manager_module.pipeline if where == "prepare_decoder" else tiny_manager
    monkeypatch.setattr(owner, where, no_memory)
    with pytest.raises(manager_module.OutOfMemory, match="Not enough memory to "
                       f"{'record the decode step' if where == 'prepare_decoder' else 'warm up'}"
                       ".*staying on cached"):
        tiny_manager.apply_preset(preset)
    assert (tiny_manager.preset, tiny_manager.config) == before
    assert (dict(tiny_manager._t3_variants), dict(tiny_manager._s3gen_variants)) == built
    assert "Not enough memory" in tiny_manager.notices[-1]


def test_a_report_names_the_configuration_it_ran_on_whatever_switches_after(make_manager,
                                                                           monkeypatch):
    """The report was named after the lock was released, from the manager's preset and
    configuration, which a switch writes one after the other: between the two writes it
    named the new preset for audio made on the old one. The sleeps widen that window."""
    manager = make_manager()
    manager.apply_preset("cached")
    widen = threading.Event()
    set_attribute = manager_module.ModelManager.__setattr__

    def slow_switch(self, name, value):
        set_attribute(self, name, value)
        if name == "preset" and widen.is_set():
            time.sleep(0.5)  # between writing the preset and the configuration

    report = manager_module.ModelManager._report

    def late_report(self, *args, **kwargs):
        time.sleep(0.2)  # the switch waiting for the lock goes first
        return report(self, *args, **kwargs)

    monkeypatch.setattr(manager_module.ModelManager, "__setattr__", slow_switch)
    monkeypatch.setattr(manager_module.ModelManager, "_report", late_report)
    widen.set()
    results = {}
    generation = threading.Thread(target=lambda: results.setdefault("report", manager.generate(
        "Hello there.", "calm-mid", GenerationParams(max_new_tokens=8)).report))
    generation.start()
    time.sleep(0.05)
    switch = threading.Thread(target=manager.apply_preset, args=("baseline",))
    switch.start()
    generation.join(30)
    switch.join(30)
    assert results["report"]["preset"] == "cached"
    assert manager.preset == "baseline"


def test_a_switch_waits_for_the_running_generation(tiny_manager, monkeypatch):
    """The generation started on `cached` finishes on it; the switch asked for meanwhile
    waits for the lock and applies afterwards; nothing runs on a mixed state."""
    t3 = tiny_manager.load().tts.t3
    started, events = threading.Event(), []

    def slow_head(module, inputs, output):
        started.set()
        time.sleep(0.02)
        return output

    handle = t3.speech_head.register_forward_hook(slow_head)
    results = {}

    def generate():
        results["report"] = tiny_manager.generate(
            "A long enough sentence.", "calm-mid",
            GenerationParams(max_new_tokens=30)).report
        events.append("generated")

    def switch():
        started.wait(10)
        tiny_manager.apply_preset("t3-int8")
        events.append("switched")

    try:
        threads = [threading.Thread(target=generate), threading.Thread(target=switch)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        handle.remove()
        tiny_manager.apply_preset("cached")
    assert events == ["generated", "switched"]
    assert results["report"]["preset"] == "cached"


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   PermissionError(13, "Read-only file system"),
                                   # what torch.save raises when the disk fills under it
                                   RuntimeError("[enforce fail at inline_container.cc:626] . "
                                                "unexpected pos 1216 vs 1046")],
                         ids=["disk-full", "read-only", "disk-full-in-torch-save"])
def test_a_full_or_read_only_disk_still_generates_and_damages_nothing(
        make_manager, tmp_path, monkeypatch, caplog, error):
    """The conditionals cache cannot be written: the voice is computed, kept in memory,
    generation works, a warning says so, and the cache on disk is as it was."""
    from chatterbox.tts import Conditionals

    cache = tmp_path / "full-disk"
    manager = make_manager(cache_dir=cache, shipped_voices=None)
    manager.add_voice("keeper", str(ROOT / "voices" / "calm-mid.wav"))
    before = sorted((p.relative_to(cache), p.read_bytes()) for p in cache.rglob("*")
                    if p.is_file())
    for path in cache.rglob("*.pt"):  # the next call must compute and try to write again
        path.unlink()
    manager.library._memory.clear()
    before = [(p, data) for p, data in before if p.suffix != ".pt"]

    def cannot_write(self, path):
        raise error

    monkeypatch.setattr(Conditionals, "save", cannot_write)
    with caplog.at_level("WARNING"):
        result = manager.generate("Still works.", "keeper", GenerationParams(max_new_tokens=8))
    assert result.report["voice"]["source"] == "computed" and len(result.wav)
    assert "stays cached in memory only" in caplog.text
    after = sorted((p.relative_to(cache), p.read_bytes()) for p in cache.rglob("*")
                   if p.is_file())
    assert after == before


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    from chatterbox_demo.files import write_atomically

    target = tmp_path / "index.json"
    write_atomically(target, lambda tmp: tmp.write_text("old"))

    def half_then_disk_full(tmp):
        tmp.write_text("half of the new fi")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(target, half_then_disk_full)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]
    write_atomically(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1


def test_a_failed_directory_write_leaves_nothing_behind(tmp_path):
    from chatterbox_demo.files import write_atomically

    def half_a_folder(tmp):
        tmp.mkdir()
        (tmp / "card.json").write_text("{}")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_atomically(tmp_path / "adapter", half_a_folder)
    assert list(tmp_path.iterdir()) == []


def test_an_atomic_write_reaches_the_disk_before_the_rename(tmp_path, monkeypatch):
    """Else a power cut can leave the rename done but not the data: an empty index."""
    import os

    from chatterbox_demo import files

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    files.write_atomically(tmp_path / "voices.json", lambda tmp: tmp.write_text("{}"))
    tmp = str(tmp_path / f".voices.json.tmp{os.getpid()}")
    assert events.index(("fsync", tmp)) < events.index(("replace", tmp))
    assert events[-1] == ("fsync", str(tmp_path))  # and the rename itself


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    """A SIGKILL leaves a hidden .NAME.tmp<pid>; a live writer's one is never touched."""
    import os

    from chatterbox_demo.files import ABANDONED_AFTER_S, write_atomically

    killed = tmp_path / f".adapter.tmp{dead_pid()}"
    killed.mkdir()
    (killed / "checkpoint.pt").write_text("gigabytes")
    other = tmp_path / f".voices.json.tmp{dead_pid()}"  # another file's: not ours to judge
    other.write_text("half")
    live = tmp_path / f".adapter.tmp{os.getppid()}"
    live.mkdir()
    long_ago = os.path.getmtime(killed) - ABANDONED_AFTER_S - 60
    for path in (killed, other, live):
        os.utime(path, (long_ago, long_ago))
    # A writer in another container on a shared cache may look dead from here: what
    # changed within the hour is left.
    recent = tmp_path / f".adapter.tmp{dead_pid()}"
    recent.mkdir()
    write_atomically(tmp_path / "adapter", _folder({"card.json": "new"}))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["adapter", live.name, other.name, recent.name])


def test_a_temporary_beside_a_swapped_out_folder_is_kept(tmp_path):
    """A swap killed between its renames: the temporary may be the only whole copy."""
    from chatterbox_demo.files import write_atomically

    old = tmp_path / f".adapter.old{dead_pid()}"
    old.mkdir()
    new = tmp_path / f".adapter.tmp{dead_pid()}"
    new.mkdir()
    write_atomically(tmp_path / "adapter", _folder({"card.json": "new"}))
    assert old.is_dir() and new.is_dir()


def _folder(files):
    def write(tmp):
        tmp.mkdir()
        for name, text in files.items():
            (tmp / name).write_text(text)
    return write


def test_a_folder_replaces_an_existing_one_whole(tmp_path):
    from chatterbox_demo.files import write_atomically

    target = tmp_path / "adapter"
    write_atomically(target, _folder({"card.json": "old", "adapter.safetensors": "old"}))
    write_atomically(target, _folder({"card.json": "new", "speaker_offset.safetensors": "new"}))
    assert {p.name: p.read_text() for p in target.iterdir()} == {
        "card.json": "new", "speaker_offset.safetensors": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_folder_that_cannot_be_put_in_place_leaves_the_old_one(tmp_path, monkeypatch):
    import os

    from chatterbox_demo import files

    target = tmp_path / "adapter"
    files.write_atomically(target, _folder({"card.json": "old"}))
    real_replace = os.replace

    def fails_for_the_new_folder(src, dst):
        if ".tmp" in Path(src).name:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", fails_for_the_new_folder)
    with pytest.raises(OSError, match="No space"):
        files.write_atomically(target, _folder({"card.json": "new"}))
    assert {p.name: p.read_text() for p in target.iterdir()} == {"card.json": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
