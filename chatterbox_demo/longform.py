"""Long text: split into sentence chunks the model is comfortable with, and join the chunks'
audio without clicks.

Chatterbox speaks up to about a minute per call and drifts on long inputs, so a long text is
split at sentence ends (not after abbreviations, inside decimals or at each dot of an
ellipsis; CJK and full-width marks too), short sentences are packed together up to
``max_chars``, and a sentence longer than that is split at clause boundaries, then at word
boundaries, then (a URL, text written without spaces) between characters.
"""

from __future__ import annotations

import re

import numpy as np

CHUNK_CHARS = 300  # about 20 s of speech: well inside what the model speaks reliably
CROSSFADE_S = 0.05

# Lower-cased words that end with a dot without ending a sentence.
ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "vs", "etc", "e.g", "i.e",
    "no", "fig", "approx", "dept", "inc", "ltd", "co", "jan", "feb", "mar", "apr", "jun",
    "jul", "aug", "sep", "sept", "oct", "nov", "dec", "u.s", "u.k", "a.m", "p.m",
}
# A sentence end: . ! ? or an ellipsis, optional closing quotes/brackets, then whitespace;
# or a CJK / full-width mark, which needs no whitespace after it (those scripts put none
# between sentences). Group 1 is the ASCII mark, None for the others.
_END = re.compile(r"""(\.\.\.|…|[.!?]+)["'”’)\]」』）]*\s+|[。！？]+["'”’)\]」』）]*\s*""")
# A clause end, likewise: , ; : or a dash before whitespace, or a CJK / full-width one.
_CLAUSE = re.compile(r"(?<=[,;:—–])\s+|(?<=[，、；：])\s*")
_OPENERS = "\"'“‘([{«「『（"  # stripped before the abbreviation lookup: "(e.g. this)"


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, each with its closing punctuation and quotes."""
    sentences, start = [], 0
    for match in _END.finditer(text):
        end_mark = match.group(1)
        words = text[start:match.start()].split()
        word = words[-1].lower().lstrip(_OPENERS) if words else ""
        if end_mark == "." and word.rstrip(".") in ABBREVIATIONS:
            continue  # "Dr. Smith", "e.g. this"
        if end_mark == "." and len(word) == 1 and word.isalpha():
            continue  # an initial: "J. R. R. Tolkien"
        following = text[match.end():match.end() + 1]
        if end_mark in ("...", "…") and following[:1].islower():
            continue  # a trailing-off pause inside a sentence
        sentences.append(text[start:match.end()].strip())
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return [s for s in sentences if s]


def _split_long(sentence: str, max_chars: int) -> list[str]:
    """A sentence over ``max_chars`` split at clause boundaries, then between words, and a
    word longer than ``max_chars`` (a URL, a run of text without spaces) into pieces of
    ``max_chars`` characters: the model is refused text over its limit."""
    pieces: list[str] = []
    for clause in _CLAUSE.split(sentence):
        if len(clause) <= max_chars:
            pieces.append(clause)
            continue
        line = ""
        words = [word[i:i + max_chars] for word in clause.split()
                 for i in range(0, len(word), max_chars)]
        for word in words:
            if line and len(line) + 1 + len(word) > max_chars:
                pieces.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        if line:
            pieces.append(line)
    return _pack(pieces, max_chars)


def _pack(pieces: list[str], max_chars: int) -> list[str]:
    """Consecutive pieces joined with spaces while they fit in ``max_chars``."""
    chunks: list[str] = []
    for piece in pieces:
        if chunks and len(chunks[-1]) + 1 + len(piece) <= max_chars:
            chunks[-1] = f"{chunks[-1]} {piece}"
        else:
            chunks.append(piece)
    return chunks


def _speaks(text: str) -> bool:
    """Whether ``text`` has a letter or digit: the manager refuses text without one."""
    return any(ch.isalnum() for ch in text)


def chunk_text(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """``text`` as chunks of whole sentences, each at most ``max_chars`` long.

    Punctuation alone ("?!") is packed with its neighbours; where it fits with neither it
    is left out: alone it would be refused as having nothing to speak, and joined to a full
    neighbour it would break the limit (a long separator line past the model's own), while
    leaving it out loses no speech. Text with nothing to speak anywhere comes back as it
    is, for the caller to refuse."""
    pieces: list[str] = []
    for sentence in split_sentences(" ".join(text.split())):
        pieces.extend([sentence] if len(sentence) <= max_chars
                      else _split_long(sentence, max_chars))
    chunks = _pack(pieces, max_chars)
    return [chunk for chunk in chunks if _speaks(chunk)] or chunks


class Stitcher:
    """Joins clips as they arrive, each overlapping the one before by ``overlap`` samples
    with a crossfade, so no join steps from one waveform to another.

    The last ``overlap`` samples of what arrived are held back until the next clip (or
    :meth:`finish`) comes, which is what lets a stream play its pieces as they are made.
    ``add(wav, same_signal=...)``: an equal-power (sine/cosine) fade for clips of different
    speech (sentence chunks); an equal-gain (sine^2/cosine^2) one for two renderings of the
    same audio (streamed token blocks), which equal-power would make 3 dB louder mid-fade.
    """

    def __init__(self, overlap: int):
        self.overlap = overlap
        self.tail = np.zeros(0, dtype=np.float32)

    def add(self, wav: np.ndarray, same_signal: bool = False) -> np.ndarray:
        """Audio ready to play: ``wav`` with its start faded over the held-back tail."""
        wav = np.asarray(wav, dtype=np.float32)
        # A clip shorter than the tail fades over the tail's end; the rest plays as is.
        fade = min(len(self.tail), len(wav))
        cut = len(self.tail) - fade
        ready, tail = self.tail[:cut], self.tail[cut:]
        if fade:
            phase = np.linspace(0.0, np.pi / 2, fade, dtype=np.float32)
            fade_out, fade_in = np.cos(phase), np.sin(phase)
            if same_signal:
                fade_out, fade_in = fade_out**2, fade_in**2
            mixed = tail * fade_out + wav[:fade] * fade_in
            wav = np.concatenate([mixed, wav[fade:]])
        keep = min(self.overlap, len(wav))
        self.tail = wav[len(wav) - keep:]
        return np.concatenate([ready, wav[:len(wav) - keep]])

    def finish(self) -> np.ndarray:
        """The held-back tail: the end of the stream."""
        tail, self.tail = self.tail, np.zeros(0, dtype=np.float32)
        return tail


def crossfade_join(wavs: list[np.ndarray], sample_rate: int,
                   seconds: float = CROSSFADE_S) -> np.ndarray:
    """Concatenate clips of different speech, overlapping each join by ``seconds`` with an
    equal-power crossfade."""
    stitcher = Stitcher(int(seconds * sample_rate))
    parts = [stitcher.add(wav) for wav in wavs] + [stitcher.finish()]
    return np.concatenate(parts).astype(np.float32)
