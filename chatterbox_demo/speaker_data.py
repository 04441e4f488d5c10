"""A speaker's dataset for fine-tuning: find the clips, check them, tokenize them once.

Two layouts are understood:

- LJSpeech: ``metadata.csv`` with ``id|text`` lines (a third, normalised-text column is
  used when present) and the audio in ``wavs/ID.wav``;
- pairs: ``NAME.wav`` next to ``NAME.txt`` holding its transcript.

Names match in any case (``NAME.WAV``, ``METADATA.CSV``, ``Wavs/``), and text files may
start with the byte-order mark that Windows tools write.

Clips that are missing, unreadable, too short or long, or without a transcript are
reported one line each and left out; the rest go on. Speech is tokenized with the model's
own S3 tokenizer and text with its text tokenizer; the tokens are cached in
``DATA_DIR/.chatterbox-tokens.json`` under the weights' identity and a hash of every
clip's audio and transcript, so a second ``prepare`` (or ``train``) reads them back.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
import torch
from chatterbox.models.s3tokenizer import S3_SR
from chatterbox.tts import ChatterboxTTS, punc_norm

from .audio import MAX_PEAK, SILENCE_PEAK
from .files import write_atomically

MIN_SECONDS = 0.5
# T3 was trained on utterances of up to about 40 s; longer clips make slow, memory-hungry
# steps for little gain, so they are left out.
MAX_SECONDS = 30.0
CACHE_NAME = ".chatterbox-tokens.json"
CACHE_VERSION = 1


class DatasetError(ValueError):
    """A folder that cannot be used at all; the message says what to fix."""


@dataclass(frozen=True)
class Clip:
    id: str
    audio: Path
    text: str


@dataclass
class Example:
    id: str
    text_tokens: list[int]
    speech_tokens: list[int]
    seconds: float


@dataclass
class SpeakerData:
    folder: Path
    examples: list[Example]
    problems: list[str] = field(default_factory=list)  # one line per clip left out
    data_hash: str = ""
    reference: str = ""  # the clip the speaker's conditionals are computed from

    @property
    def seconds(self) -> float:
        return sum(e.seconds for e in self.examples)

    def report(self) -> str:
        lines = [f"{len(self.examples)} clips usable, {self.seconds / 60:.1f} minutes of "
                 f"speech; {len(self.problems)} left out"]
        lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)


def find_clips(folder: Path) -> tuple[list[Clip], list[str]]:
    """The clips a folder describes, and a line for each entry that cannot be a clip."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder: give a folder of clips with "
                           "transcripts (metadata.csv + wavs/, or NAME.wav + NAME.txt)")
    metadata = _entry(folder, "metadata.csv")
    if metadata.exists():
        return _ljspeech(folder, metadata)
    clips, problems = [], []
    audios, transcripts = _by_stem(folder, ".wav"), _by_stem(folder, ".txt")
    for stem, audio in audios.items():
        if stem not in transcripts:
            problems.append(f"{audio.name}: no transcript ({stem}.txt is missing)")
            continue
        clips.append(Clip(stem, audio, _read_text(transcripts[stem])))
    for stem, transcript in transcripts.items():
        if stem not in audios:
            problems.append(f"{transcript.name}: no audio ({stem}.wav is missing)")
    if not clips and not problems:
        raise DatasetError(f"{folder} has no clips: expected metadata.csv with wavs/, or "
                           "NAME.wav + NAME.txt pairs")
    return clips, problems


def _entry(folder: Path, name: str) -> Path:
    """``folder / name``, or the entry that has that name in another case (METADATA.CSV,
    Wavs/), as Windows, which ignores case, lets a user write it."""
    if not (folder / name).exists() and folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.name.lower() == name:
                return path
    return folder / name


def _by_stem(folder: Path, suffix: str) -> dict[str, Path]:
    """The folder's files with this extension in any case (Windows and some recorders
    write ``.WAV``), by name without it, in name order."""
    if not folder.is_dir():
        return {}
    return {path.stem: path for path in sorted(folder.iterdir())
            if path.suffix.lower() == suffix}


# "utf-8-sig" drops the byte-order mark that Notepad and Excel's "CSV UTF-8" write first:
# read as plain UTF-8 it would stick to the first clip's id, or become a token of its text.
def _read_text(path: Path) -> str:
    try:
        return " ".join(path.read_text(encoding="utf-8-sig").split())
    except (OSError, UnicodeDecodeError):
        return ""


def _ljspeech(folder: Path, metadata: Path) -> tuple[list[Clip], list[str]]:
    clips, problems = [], []
    try:
        rows = list(csv.reader(metadata.read_text(encoding="utf-8-sig").splitlines(),
                               delimiter="|", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError:
        raise DatasetError(f"{metadata} is not UTF-8 text: save it as UTF-8 (Excel: "
                           "'CSV UTF-8')") from None
    except OSError as exc:
        raise DatasetError(f"{metadata} is unreadable ({exc})") from None
    wavs = _entry(folder, "wavs")
    audios = _by_stem(wavs, ".wav")
    named = set()  # every id a line gives, so that audio is reported only when none does
    for number, row in enumerate(rows, 1):
        if not row or not row[0].strip():
            continue
        clip_id = row[0].strip()
        named.add(clip_id)
        if len(row) < 2:
            problems.append(f"metadata.csv line {number}: expected 'id|text'")
            continue
        text = " ".join((row[2] if len(row) > 2 and row[2].strip() else row[1]).split())
        if "/" in clip_id or "\\" in clip_id or clip_id.startswith("."):
            problems.append(f"metadata.csv line {number}: id {clip_id!r} is not a file name")
            continue
        clips.append(Clip(clip_id, audios.get(clip_id, wavs / f"{clip_id}.wav"), text))
    problems += [f"{wavs.name}/{audio.name}: no transcript (no {metadata.name} line for {stem})"
                 for stem, audio in audios.items() if stem not in named]
    return clips, problems


def check_clip(clip: Clip) -> tuple[np.ndarray | None, str | None]:
    """(16 kHz mono samples, None) for a usable clip, else (None, why not)."""
    if not clip.text or not any(ch.isalnum() for ch in clip.text):
        return None, f"{clip.id}: empty transcript"
    if not clip.audio.exists():
        return None, f"{clip.id}: audio {clip.audio.name} is missing"
    try:
        info = sf.info(str(clip.audio))
    except Exception:  # soundfile raises its own error types for every bad file
        return None, f"{clip.id}: audio {clip.audio.name} is unreadable"
    if not MIN_SECONDS <= info.duration <= MAX_SECONDS:
        return None, (f"{clip.id}: {info.duration:.1f} s long; clips must be "
                      f"{MIN_SECONDS}-{MAX_SECONDS:.0f} s")
    try:
        wav, _ = librosa.load(str(clip.audio), sr=S3_SR, mono=True)
    except librosa.util.exceptions.ParameterError:
        # Resampling refuses a NaN or Inf sample, before the check below can see it.
        return None, f"{clip.id}: audio is silent or damaged"
    # The voice library's thresholds, so that a clip refused as a voice is not taken for
    # training either.
    if not np.isfinite(wav).all() or not SILENCE_PEAK <= np.abs(wav).max() <= MAX_PEAK:
        return None, f"{clip.id}: audio is silent or damaged"
    return wav, None


def data_hash(clips: list[Clip]) -> str:
    """One hash over every clip's id, audio bytes and transcript."""
    digest = hashlib.sha256()
    for clip in sorted(clips, key=lambda c: c.id):
        digest.update(clip.id.encode())
        digest.update(clip.text.encode())
        if clip.audio.exists():
            digest.update(hashlib.sha256(clip.audio.read_bytes()).digest())
    return digest.hexdigest()


def prepare(folder: Path, tts: ChatterboxTTS, weights_identity: str,
            progress=None) -> SpeakerData:
    """Check and tokenize a speaker's folder, or read the tokens cached by an earlier
    call for the same clips and weights. Raises DatasetError when no clip is usable."""
    folder = Path(folder)
    clips, problems = find_clips(folder)
    digest = data_hash(clips)
    cached = _read_cache(folder, weights_identity, digest, clips)
    if cached is not None:
        return cached
    examples, lengths_by_audio = [], {}
    for index, clip in enumerate(clips):
        if progress:
            progress(index / max(1, len(clips)), f"tokenizing {clip.id}")
        wav, problem = check_clip(clip)
        if problem:
            problems.append(problem)
            continue
        seconds = len(wav) / S3_SR
        with torch.inference_mode():
            speech, lengths = tts.s3gen.tokenizer.forward([torch.from_numpy(wav)])
        speech_tokens = speech[0, : int(lengths[0])].tolist()
        text_tokens = tts.tokenizer.text_to_tokens(punc_norm(clip.text))[0].tolist()
        examples.append(Example(clip.id, text_tokens, speech_tokens, round(seconds, 3)))
        lengths_by_audio[str(clip.audio)] = seconds
    if not examples:
        raise DatasetError("No usable clip in " + str(folder) + ":\n" + "\n".join(problems))
    # The speaker's conditionals come from the longest clip up to 10 s (upstream uses the
    # first 10 s of a reference for S3Gen and 6 s for T3's prompt), else the shortest.
    short = {a: s for a, s in lengths_by_audio.items() if s <= 10.0}
    reference = (max(short, key=short.get) if short
                 else min(lengths_by_audio, key=lengths_by_audio.get))
    data = SpeakerData(folder, examples, problems, digest, reference)
    _write_cache(folder, weights_identity, data)
    return data


def _read_cache(folder: Path, weights_identity: str, digest: str,
                clips: list[Clip]) -> SpeakerData | None:
    path = folder / CACHE_NAME
    try:
        stored = json.loads(path.read_text())
        if (stored["version"], stored["weights"], stored["data_hash"]) != (
                CACHE_VERSION, weights_identity, digest):
            return None
        # Stored relative to the folder, so that it follows the folder when it is moved or
        # copied. An older cache held an absolute path, which after a move named the old
        # copy's clip (or nothing): stale. And it must name one of this folder's clips, as
        # the cache may come from an uploaded zip.
        reference = folder / stored["reference"]
        if Path(stored["reference"]).is_absolute() or \
                reference not in {clip.audio for clip in clips}:
            return None
        return SpeakerData(folder, [Example(**e) for e in stored["examples"]],
                           stored["problems"], digest, str(reference))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # no cache, or one from other clips or weights: tokenize again


def _write_cache(folder: Path, weights_identity: str, data: SpeakerData) -> None:
    path = folder / CACHE_NAME
    reference = Path(data.reference).relative_to(folder).as_posix()
    body = {"version": CACHE_VERSION, "weights": weights_identity,
            "data_hash": data.data_hash, "reference": reference,
            "problems": data.problems, "examples": [asdict(e) for e in data.examples]}
    try:
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(body)))
    except OSError:
        pass  # a read-only dataset folder: tokenize again next time


DEMO_SENTENCES = (
    "The morning train was late again, so I walked along the river instead.",
    "Please put the blue folder on the second shelf by the window.",
    "We planted tomatoes, beans and a row of sunflowers this spring.",
    "The museum opens at nine and closes early on Sundays.",
    "She laughed and said the recipe was her grandmother's secret.",
    "A light rain fell over the harbour as the boats came home.",
    "Turn left at the bakery and the library is just ahead.",
    "He practised the piano every evening for an hour.",
    "The results will be ready by Thursday afternoon.",
    "Our neighbours have a small grey cat called Pepper.",
    "Remember to bring a warm jacket; the hills get windy.",
    "The old clock in the hall chimed twelve times.",
)


def make_espeak_dataset(folder: Path, clips: int = 12, voice: str = "en-us") -> Path:
    """A small speaker dataset made offline with espeak-ng: ``NAME.wav`` + ``NAME.txt``
    pairs in one synthetic voice. For trying the commands and for the tests; real use
    wants 30-60 minutes of one person's clean speech."""
    import shutil
    import subprocess

    folder = Path(folder)
    # Only into a new or empty folder: the clips' names are fixed, so they overwrote a
    # user's own clipNNN.wav and .txt, and other clips would join the dataset unseen.
    if folder.exists() and not folder.is_dir():
        raise DatasetError(f"{folder} is a file; give the path of a new or empty folder "
                           "for the demo clips.")
    held = sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []
    if held:
        raise DatasetError(f"{folder} already holds files ({', '.join(held[:3])}"
                           f"{', ...' if len(held) > 3 else ''}); give a new or empty folder "
                           "for the demo clips.")
    if shutil.which("espeak-ng") is None:
        raise DatasetError("espeak-ng is not installed (apt-get install espeak-ng)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder of the path should be, or no permission
        raise DatasetError(f"Cannot make the folder {folder}: {exc.strerror}.") from None
    for index in range(clips):
        sentence = DEMO_SENTENCES[index % len(DEMO_SENTENCES)]
        if index >= len(DEMO_SENTENCES):
            sentence = f"Take {index // len(DEMO_SENTENCES) + 1}. {sentence}"
        name = f"clip{index:03d}"
        subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w",
                        str(folder / f"{name}.wav"), sentence], check=True,
                       capture_output=True)
        (folder / f"{name}.txt").write_text(sentence + "\n", encoding="utf-8")
    return folder


MAX_ZIP_BYTES = 4 * 2**30  # uncompressed: an hour of 24 kHz WAV is about 170 MB
MAX_ZIP_FILES = 50_000


def extract_zip(archive: Path, dest: Path) -> Path:
    """Unpack an uploaded zip into ``dest`` after checking every entry (no absolute or
    ``..`` paths, no links, bounded size and count), and return the folder that holds the
    content: ``dest`` itself, or the one folder everything was zipped in."""
    import lzma
    import stat
    import zipfile
    import zlib

    try:
        zipped = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise DatasetError("The upload is not a zip file.") from None
    with zipped:
        entries = zipped.infolist()
        # Without a file, nothing is unpacked: not even ``dest`` would be made.
        if all(entry.is_dir() for entry in entries):
            raise DatasetError("The zip is empty: zip the folder that holds the files.")
        if len(entries) > MAX_ZIP_FILES:
            raise DatasetError(f"The zip has {len(entries)} entries; the limit is "
                               f"{MAX_ZIP_FILES}.")
        if sum(e.file_size for e in entries) > MAX_ZIP_BYTES:
            raise DatasetError(f"The zip unpacks to more than {MAX_ZIP_BYTES // 2**30} GB.")
        for entry in entries:
            parts = Path(entry.filename).parts
            if entry.filename.startswith(("/", "\\")) or ".." in parts or \
                    (parts and ":" in parts[0]):
                raise DatasetError(f"The zip entry {entry.filename!r} points outside "
                                   "the archive; zip the folder itself.")
            if stat.S_ISLNK(entry.external_attr >> 16):
                raise DatasetError(f"The zip entry {entry.filename!r} is a link; zip "
                                   "plain files.")
            if entry.flag_bits & 0x1:  # the zip format's "encrypted" flag
                raise DatasetError("The zip is password-protected: zip it again without a "
                                   "password.")
        try:
            zipped.extractall(dest)
        except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError):
            # a bad CRC, garbled Deflate or LZMA data, or an entry cut short
            raise DatasetError("The zip is damaged: zip the folder again.") from None
        except OSError as error:
            if error.errno is not None:  # the disk's own trouble (full, read-only): not the zip's
                raise
            # bz2 reports garbled data as a bare OSError("Invalid data stream")
            raise DatasetError("The zip is damaged: zip the folder again.") from None
        except NotImplementedError:  # Deflate64 (Windows' zip for large files), for one
            raise DatasetError("The zip uses a compression this app cannot unpack: zip it "
                               "again with ordinary (Deflate) compression.") from None
    inside = [p for p in Path(dest).iterdir() if p.name != "__MACOSX"]
    return inside[0] if len(inside) == 1 and inside[0].is_dir() else Path(dest)
