"""The voice library: named reference clips and their cached conditionals.

Conditionals (speaker embedding, T3 prompt tokens, S3Gen reference features) are computed
once per (audio content, weights) pair and kept in memory and on disk::

    CACHE/voices.json                     the library index: name -> audio hash, settings
    CACHE/audio/<sha256><ext>             a copy of each user voice's source audio
    CACHE/conds/<weights-key>/<sha256>.pt Conditionals.save() output, one per clip
    CACHE/adapters/<sha256>/              a copy of each fine-tuned voice's adapter directory

Files are written to a temporary name and renamed, so a killed process never leaves a
half-written entry, and cache files are read with ``weights_only=True`` only. Several
processes may share one cache (the app, and ``voices add`` from a shell): each change to
the index is made under a lock on ``CACHE/voices.json.lock``, on the index as it is on disk
at that moment, so one process never writes back a list that lacks the other's voices.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import threading
import unicodedata
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from chatterbox.tts import Conditionals

from .audio import EXTENSIONS, AudioError, ReferenceClip, load_reference
from .config import RANGES, check_number
from .files import write_atomically

log = logging.getLogger(__name__)

BUILTIN_NAME = "builtin"
MAX_NAME_CHARS = 64
INDEX_VERSION = 1
# Voices a user added (a clip, or a fine-tuned adapter): kept in the index, renamable and
# removable; the others ship with the weights or the app.
USER_KINDS = ("user", "finetuned")
# flock() keeps other processes out; this keeps out other threads and other libraries on
# the same cache in this process as well, whatever the file system makes of flock(). Reads
# that catch up with the index take it too (a change looks voices up, so it is reentrant).
_INDEX_LOCK = threading.RLock()


class VoiceError(ValueError):
    """A voice operation the library refused; the message says what to do instead."""


@dataclass(frozen=True)
class Voice:
    name: str
    # "builtin" (ships with the weights), "shipped" (voices/ folder), "user" (a clip),
    # "finetuned" (an adapter directory from `finetune train`)
    kind: str
    exaggeration: float
    sha256: str | None = None  # None for the built-in voice: it has no source audio
    audio: str | None = None  # path of the source audio
    seconds: float | None = None
    adapter: str | None = None  # fine-tuned voices: the stored adapter directory
    method: str | None = None  # fine-tuned voices: lora, speaker-adapter or full


ComputeFn = Callable[[Path, float], Conditionals]


def name_key(name: str) -> str:
    """Names that differ only by case or Unicode normalisation are the same name."""
    return unicodedata.normalize("NFKC", name).casefold()


def check_name(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise VoiceError("Give the voice a name.")
    name = unicodedata.normalize("NFC", name.strip())
    if len(name) > MAX_NAME_CHARS:
        raise VoiceError(f"Voice names are limited to {MAX_NAME_CHARS} characters.")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs") for ch in name):
        raise VoiceError("Voice names cannot contain control characters.")
    if "/" in name or "\\" in name or name.startswith(".") or ".." in name:
        raise VoiceError(
            f"{name!r} looks like a path; use a plain name such as 'narrator' or 'Ann 2'."
        )
    # Reserved even while the loaded weights have no built-in voice: weights that do may be
    # loaded later on the same cache, and the two would then share one name.
    if name_key(name) == name_key(BUILTIN_NAME):
        raise VoiceError(f"{name!r} is reserved for the voice that ships with the weights; "
                         "choose another name.")
    return name


class VoiceLibrary:
    """Named voices and the conditionals cache. Not thread-safe by itself: the model
    manager calls it under its one lock."""

    def __init__(self, cache_dir: Path, weights_identity: str, compute: ComputeFn,
                 device: str = "cpu"):
        self.cache_dir = Path(cache_dir)
        self.compute = compute
        self.device = device
        self.weights_identity = weights_identity
        weights_key = hashlib.sha256(weights_identity.encode()).hexdigest()[:16]
        self.conds_dir = self.cache_dir / "conds" / weights_key
        self.audio_dir = self.cache_dir / "audio"
        self.index_path = self.cache_dir / "voices.json"
        self._voices: dict[str, Voice] = {}  # by name_key
        self._memory: dict[str, Conditionals] = {}  # by sha256 (or BUILTIN_NAME)
        self._seen: tuple | None = None  # the index's stamp when last read
        try:
            renamed = self._reload()
        except VoiceError as exc:  # unreadable for now: the first look later reads it again
            log.warning("%s", exc)
            renamed = None
        if renamed:
            log.warning("A user voice is named %r, which is reserved for the voice that ships "
                        "with the weights; it is now listed as %r", *renamed)
            try:
                with self._changing():  # and saved so, for the other processes too
                    self._commit(self._voices)
            except VoiceError as exc:
                log.warning("%s", exc)

    # --- registration -----------------------------------------------------------------

    def register_builtin(self, conds: Conditionals | None) -> None:
        """The voice shipped inside the weights (``conds.pt``), when there is one."""
        if conds is None:
            return
        # Its key never holds a user voice (check_name refuses the name and _reload renames
        # one from an older index), so this replaces nothing of the user's.
        exaggeration = float(conds.t3.emotion_adv.reshape(-1)[0])
        self._voices[name_key(BUILTIN_NAME)] = Voice(BUILTIN_NAME, "builtin", exaggeration)
        self._memory[BUILTIN_NAME] = conds

    def register_shipped(self, folder: Path, exaggeration: float = 0.5) -> None:
        """The reference clips in ``voices/``: listed read-only, conditionals precomputed."""
        for path in sorted(Path(folder).glob("*.wav")):
            try:
                clip = load_reference(path)
            except AudioError as exc:  # one bad file must not keep the app from starting
                log.warning("Skipping the shipped voice %s: %s", path.name, exc)
                continue
            voice = Voice(path.stem, "shipped", exaggeration, clip.sha256, str(path),
                          round(clip.seconds, 2))
            if name_key(voice.name) in self._voices:
                log.warning("A user voice is named %r; the shipped clip is hidden", voice.name)
                continue
            self._voices[name_key(voice.name)] = voice
            if not self._conds_path(clip.sha256).exists():
                self._store(clip.sha256, self.compute(path, exaggeration))

    # --- queries ----------------------------------------------------------------------

    def list(self) -> list[Voice]:
        self._catch_up()
        return sorted(self._voices.values(), key=_listing_order)

    def names(self) -> list[str]:
        return [v.name for v in self.list()]

    def get(self, name: str) -> Voice:
        self._catch_up()
        voice = self._voices.get(name_key(name)) if isinstance(name, str) else None
        if voice is None:
            raise unknown_voice(name, self.names())
        return voice

    def conditionals(self, voice: Voice, cached: bool = True) -> tuple[Conditionals, str]:
        """The voice's conditionals and where they came from: memory, disk or computed.

        ``cached=False`` is the stock behaviour: recompute from the source audio each call.
        """
        if voice.sha256 is None:  # built-in: exists only as conditionals
            return self._memory[BUILTIN_NAME], "memory"
        if voice.adapter is not None:  # trained once: nothing to recompute per call
            return self._adapter_conds(voice)
        if not cached:
            return self.compute(Path(voice.audio), voice.exaggeration), "computed"
        return self._cached(voice.sha256, Path(voice.audio), voice.exaggeration)

    def conditionals_for_file(self, path: Path, exaggeration: float,
                              cached: bool = True) -> tuple[Conditionals, str]:
        """Conditionals for a clip that is not in the library (``synth --voice PATH``)."""
        clip = load_reference(path)
        if not cached:
            return self.compute(clip.path, exaggeration), "computed"
        return self._cached(clip.sha256, clip.path, exaggeration)

    def _cached(self, sha256: str, audio: Path, exaggeration: float):
        if sha256 in self._memory:
            return self._memory[sha256], "memory"
        conds = self._read_conds(sha256)
        if conds is not None:
            self._memory[sha256] = conds
            return conds, "disk"
        if not audio.exists():
            raise VoiceError(f"The source audio {audio} of this voice is gone; add it again.")
        if not _holds_file(audio, sha256):
            raise VoiceError(f"The stored audio {audio} of this voice is damaged; remove the "
                             "voice and add its clip again.")
        conds = self.compute(audio, exaggeration)
        self._store(sha256, conds)
        return conds, "computed"

    # --- changes ----------------------------------------------------------------------

    def add(self, name, audio_path, exaggeration: float = 0.5) -> Voice:
        """Add a user voice. Checks everything before touching the library or the disk."""
        name = self._new_name(name, exaggeration)
        try:
            clip = load_reference(audio_path)
        except AudioError as exc:
            raise VoiceError(str(exc)) from None
        stored = self._store_audio(clip)
        if clip.sha256 not in self._memory and self._read_conds(clip.sha256) is None:
            self._store(clip.sha256, self.compute(stored, float(exaggeration)))
        voice = Voice(name, "user", float(exaggeration), clip.sha256, str(stored),
                      round(clip.seconds, 2))
        with self._changing():
            self._new_name(name, exaggeration)  # another process may have taken it meanwhile
            self._commit({**self._voices, name_key(name): voice})
        return voice

    def add_finetuned(self, name, adapter_dir, base_identity: str,
                      exaggeration: float = 0.5, *, next_free_name: bool = False) -> Voice:
        """Add a fine-tuned voice from an adapter directory trained on the
        ``base_identity`` weights: its files are copied into the cache (the training
        checkpoint is left behind) and its conditionals read. With ``next_free_name``, a
        name taken meanwhile gets a number ("Ann 2") instead of refusing: for an adapter
        that exists nowhere else (the page trains into a temporary folder)."""
        from .finetune import FILES, read_card

        name = check_name(name) if next_free_name else self._new_name(name, exaggeration)
        adapter_dir = Path(adapter_dir)
        card = read_card(adapter_dir, base_identity)
        files = ["card.json", "conds.pt", FILES[card["method"]]]
        sha256 = _files_digest(adapter_dir, files)
        stored = self.cache_dir / "adapters" / sha256
        # A stored copy damaged since (a full disk, a bad copy of the cache) is replaced:
        # importing the adapter again is what the error for a damaged one asks for.
        if not _holds(stored, files, sha256):
            def copy(tmp: Path) -> None:
                shutil.rmtree(tmp, ignore_errors=True)  # left by a killed earlier run
                tmp.mkdir()
                for file in files:
                    shutil.copyfile(adapter_dir / file, tmp / file)
            try:
                stored.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(stored, copy)
            except OSError as exc:  # a full or read-only cache
                raise _not_saved(exc) from None
        voice = Voice(name, "finetuned", float(exaggeration), sha256, None, None,
                      str(stored), card["method"])
        self._adapter_conds(voice)  # a damaged conds.pt fails here, before it is listed
        with self._changing():
            if next_free_name:
                voice = replace(voice, name=self._next_free_name(name))
            self._new_name(voice.name, exaggeration)  # another process may have taken it
            self._commit({**self._voices, name_key(voice.name): voice})
        return voice

    def _next_free_name(self, name: str) -> str:
        """``name``, or the first of "name 2", "name 3", ... that no voice has (shortened
        to fit the length limit)."""
        candidate, number = name, 1
        while name_key(candidate) in self._voices:
            number += 1
            suffix = f" {number}"
            candidate = name[:MAX_NAME_CHARS - len(suffix)].rstrip() + suffix
        return candidate

    def _adapter_conds(self, voice: Voice) -> tuple[Conditionals, str]:
        from .finetune import read_card

        if voice.sha256 in self._memory:
            return self._memory[voice.sha256], "memory"
        # Checked for every method, a speaker-adapter too: its offset is baked into these
        # conditionals, which fit only the weights it was trained on (the index lists the
        # voice whatever weights are loaded). Also refuses weights damaged since import.
        read_card(Path(voice.adapter), self.weights_identity)
        path = Path(voice.adapter) / "conds.pt"
        try:
            conds = Conditionals.load(path, map_location="cpu").to(self.device)
        except Exception as exc:  # missing, truncated, or not a tensors-only file
            raise VoiceError(f"The adapter's conditionals {path} are unreadable ({exc}); "
                             "import the adapter again.") from None
        self._memory[voice.sha256] = conds
        return conds, "disk"

    def check_new_name(self, name, exaggeration: float = 0.5) -> str:
        """The name a voice added now would get, or the VoiceError adding it would raise:
        for a long job (fine-tuning) that ends in adding a voice, to fail before it starts
        rather than after."""
        self._catch_up()  # a name another process took meanwhile is taken here too
        return self._new_name(name, exaggeration)

    def _new_name(self, name, exaggeration) -> str:
        """A free, valid name for a new voice, with its exaggeration checked too."""
        name = check_name(name)
        clash = self._voices.get(name_key(name))
        if clash is not None:
            # A shipped voice cannot be removed: do not suggest it.
            remedy = ("choose another name or remove that one first" if clash.kind in USER_KINDS
                      else "it ships with the app; choose another name")
            raise VoiceError(f"A voice named {clash.name!r} exists; {remedy}.")
        low, high = RANGES["exaggeration"]
        check_number("exaggeration", exaggeration, low, high)
        return name

    def remove(self, name: str) -> Voice:
        with self._changing():
            voice = self.user_voice(name, "removed")
            self._commit({k: v for k, v in self._voices.items() if v is not voice})
        # The audio and conditionals files stay: another voice may share the content,
        # and re-adding the same clip later is then instant.
        return voice

    def rename(self, old: str, new: str) -> Voice:
        with self._changing():
            voice = self.user_voice(old, "renamed")
            new = check_name(new)
            clash = self._voices.get(name_key(new))
            if clash is not None and clash is not voice:
                raise VoiceError(f"A voice named {clash.name!r} exists; choose another name.")
            renamed = Voice(**{**asdict(voice), "name": new})
            voices = {k: v for k, v in self._voices.items() if v is not voice}
            self._commit({**voices, name_key(new): renamed})
        return renamed

    def user_voice(self, name: str, verb: str) -> Voice:
        """The voice called ``name`` if a user may change it; else a VoiceError that says
        why, ``verb`` ("removed", "renamed") completing its sentence."""
        voice = self.get(name)
        if voice.kind not in USER_KINDS:
            where = "the weights" if voice.kind == "builtin" else "the app"
            raise VoiceError(f"{voice.name!r} ships with {where} and cannot be {verb}.")
        return voice

    # --- disk -------------------------------------------------------------------------

    def _conds_path(self, sha256: str) -> Path:
        return self.conds_dir / f"{sha256}.pt"

    def _read_conds(self, sha256: str) -> Conditionals | None:
        path = self._conds_path(sha256)
        if not path.exists():
            return None
        try:
            return Conditionals.load(path, map_location="cpu").to(self.device)
        except Exception as exc:  # truncated, corrupted, or not a tensors-only file
            aside = path.with_name(path.name + ".corrupt")
            log.warning("Cache file %s is unreadable (%s); moved to %s and recomputing",
                        path, exc, aside.name)
            _move_aside(path, aside)
            return None

    def _store(self, sha256: str, conds: Conditionals) -> None:
        self._memory[sha256] = conds
        path = self._conds_path(sha256)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, conds.save)
        # torch.save reports a full disk as a RuntimeError from its zip writer ("unexpected
        # pos ..."), not an OSError.
        except (OSError, RuntimeError) as exc:
            log.warning("Could not write %s (%s); the voice stays cached in memory only",
                        path, exc)

    def _store_audio(self, clip: ReferenceClip) -> Path:
        suffix = clip.path.suffix.lower()
        suffix = suffix if suffix in EXTENSIONS else ".wav"
        target = self.audio_dir / f"{clip.sha256}{suffix}"
        # Its name is its content's hash: a copy damaged since (cut short by a crash or a
        # full disk) is replaced from the upload, not reused.
        if not _holds_file(target, clip.sha256):
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(target, lambda tmp: shutil.copyfile(clip.path, tmp))
            except OSError as exc:  # a read-only or full cache
                raise _not_saved(exc) from None
        return target

    def _read_index(self) -> list[Voice]:
        """The user voices in the index. Content that cannot be parsed is moved aside (and
        the list starts empty); a file that cannot be read now (out of file handles, an I/O
        error) raises VoiceError and is left as it is: it may read fine in a moment."""
        try:
            text = self.index_path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise VoiceError(f"Could not read the voice index ({exc.strerror or exc}); "
                             "nothing was changed, try again.") from None
        try:
            return _parse_index(text)
        except Exception as exc:
            aside = _unused(self.index_path.with_name("voices.json.corrupt"))
            log.warning("Voice index %s is unreadable (%s); moved to %s",
                        self.index_path, exc, aside.name)
            _move_aside(self.index_path, aside)
            return []

    def _reload(self) -> tuple[str, str] | None:
        """Bring the user voices in memory up to date with the index on disk, where another
        process may have added, renamed or removed some. A user voice from an index older
        than the reserved name gets a free one; returns (old name, new name) then."""
        # The stamp first: if another process replaces the index while it is read, the
        # next look sees a newer stamp and reads again.
        stamp = self._index_stamp()
        users = {name_key(voice.name): voice for voice in self._read_index()}
        renamed = None
        clash = users.pop(name_key(BUILTIN_NAME), None)
        if clash is not None:
            number = 2
            while name_key(f"{clash.name} {number}") in users:
                number += 1
            new = Voice(**{**asdict(clash), "name": f"{clash.name} {number}"})
            users[name_key(new.name)] = new
            renamed = (clash.name, new.name)
        others = {k: v for k, v in self._voices.items() if v.kind not in USER_KINDS}
        self._voices = {**others, **users}  # a user voice hides a shipped one, as at start-up
        self._seen = stamp
        return renamed

    def _index_stamp(self) -> tuple | None:
        try:
            found = self.index_path.stat()
        except OSError:
            return None
        return found.st_ino, found.st_mtime_ns, found.st_size

    def _catch_up(self) -> None:
        """Show what another process (``voices add`` in a shell) changed since the index was
        last read: every change replaces the file, so a new stamp means a new list."""
        with _INDEX_LOCK:  # not between a change's reading and writing of the index
            if self._index_stamp() != self._seen:
                try:
                    self._reload()
                except VoiceError as exc:  # the list in memory stays; the next look retries
                    log.warning("%s", exc)

    @contextmanager
    def _changing(self):
        """Hold the index lock, with memory brought up to date with the index: a change is
        checked and made on the index as it is now, and no other process writes meanwhile."""
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            handle = open(self.cache_dir / "voices.json.lock", "a")
        except OSError as exc:
            raise _not_saved(exc) from None
        with _INDEX_LOCK, handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed
            self._reload()
            yield

    def _commit(self, voices: dict[str, Voice]) -> None:
        """Write the index for ``voices``, then adopt them: a failed write changes nothing.
        Called inside ``_changing``, with ``voices`` made from what it read."""
        entries = []
        for voice in voices.values():
            if voice.kind not in USER_KINDS:
                continue
            entry = asdict(voice)
            if voice.kind == "user":  # the index format from before fine-tuned voices
                entry = {k: v for k, v in entry.items() if k not in ("kind", "adapter", "method")}
            entries.append(entry)
        try:
            body = json.dumps({"version": INDEX_VERSION, "voices": entries}, indent=1)
            write_atomically(self.index_path, lambda tmp: tmp.write_text(body))
        except OSError as exc:
            raise _not_saved(exc) from None
        self._voices = voices
        self._seen = self._index_stamp()


def unknown_voice(name, names: list[str]) -> VoiceError:
    return VoiceError(f"Unknown voice {name!r}; available: {', '.join(names) or 'none yet'}")


def names_on_disk(cache_dir: Path, shipped: Path | None) -> list[str] | None:
    """The voices a library on ``cache_dir`` would list, but for the one inside the weights,
    read from its files without a model: the command line refuses a name that is not there
    before loading one (and building a preset, minutes when it compiles). None when the
    files cannot tell for sure (an index unreadable now, or one an older version wrote with
    the reserved name, which the library renames): the library then decides."""
    try:
        users = _parse_index((Path(cache_dir) / "voices.json").read_text())
    except FileNotFoundError:
        users = []
    except Exception:
        return None
    voices = {name_key(voice.name): voice for voice in users}
    if name_key(BUILTIN_NAME) in voices:
        return None
    clips = sorted(Path(shipped).glob("*.wav")) if shipped and Path(shipped).is_dir() else []
    for path in clips:  # a user voice hides a shipped one of the same name, as in the library
        voices.setdefault(name_key(path.stem), Voice(path.stem, "shipped", 0.5))
    return [voice.name for voice in sorted(voices.values(), key=_listing_order)]


def _parse_index(text: str) -> list[Voice]:
    """The user voices in the index's text; raises on anything not an index."""
    fields = set(Voice.__dataclass_fields__)
    return [Voice(**{**{k: v for k, v in entry.items() if k in fields},
                     "kind": entry.get("kind") if entry.get("kind") in USER_KINDS else "user"})
            for entry in json.loads(text)["voices"]]


def _listing_order(voice: Voice) -> tuple:
    order = {"builtin": 0, "shipped": 1, "user": 2, "finetuned": 3}
    return order[voice.kind], name_key(voice.name)


def _files_digest(folder: Path, files: list[str]) -> str:
    """One hash of the named files' contents, read in pieces (a full T3 is gigabytes)."""
    digest = hashlib.sha256()
    for file in files:
        with open(folder / file, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()


def _holds(folder: Path, files: list[str], sha256: str) -> bool:
    """Whether ``folder`` holds ``files`` whole: their digest is its name."""
    try:
        return _files_digest(folder, files) == sha256
    except OSError:  # missing, or a file gone from it
        return False


def _holds_file(path: Path, sha256: str) -> bool:
    """Whether the file at ``path`` is whole: its content hashes to ``sha256``."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest() == sha256
    except OSError:  # missing or unreadable
        return False


def _not_saved(exc: OSError) -> VoiceError:
    return VoiceError(f"Could not save the voice library ({exc.strerror or exc}); "
                      "nothing was changed.")


def _unused(path: Path) -> Path:
    """``path``, or ``path.2``, ``path.3``...: the first that does not exist, so that a
    file moved aside earlier is never overwritten."""
    number, candidate = 1, path
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate


def _move_aside(path: Path, aside: Path) -> None:
    """Keep an unreadable file for a look later. Failing that (a read-only cache, or
    another process moved it first) it is left where it is: the caller goes on without it
    either way, and it is rewritten by the next successful save."""
    try:
        os.replace(path, aside)
    except OSError as exc:
        log.warning("Could not move %s aside (%s)", path, exc.strerror or exc)
