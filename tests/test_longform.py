"""Long text: sentence chunks, click-free joins, one voice computation, same seed same audio."""

from __future__ import annotations

import numpy as np
import pytest

from chatterbox_demo import longform
from chatterbox_demo.config import GenerationParams
from chatterbox_demo.longform import chunk_text, crossfade_join, split_sentences
from chatterbox_demo.manager import check_text


@pytest.mark.parametrize("text, sentences", [
    ("Hello there. How are you? Fine!", ["Hello there.", "How are you?", "Fine!"]),
    ("Dr. Smith met Mr. Jones at 3.5 p.m. today. Then they left.",
     ["Dr. Smith met Mr. Jones at 3.5 p.m. today.", "Then they left."]),
    ("It costs $3.99, e.g. a coffee. Pi is 3.14159.",
     ["It costs $3.99, e.g. a coffee.", "Pi is 3.14159."]),
    ('She said "Stop!" Then silence... And then a bang.',
     ['She said "Stop!"', "Then silence...", "And then a bang."]),
    ("Wait... what was that? J. R. R. Tolkien wrote it.",
     ["Wait... what was that?", "J. R. R. Tolkien wrote it."]),
    ("No final stop", ["No final stop"]),
])
def test_sentences_respect_abbreviations_decimals_quotes_and_ellipses(text, sentences):
    assert split_sentences(text) == sentences


def test_chunks_pack_sentences_and_split_long_ones_at_clauses():
    long_sentence = ", ".join(f"clause number {i} goes here" for i in range(30)) + "."
    text = "Short one. Another short one. " + long_sentence + " The end."
    chunks = chunk_text(text, max_chars=120)
    assert chunks[0] == "Short one. Another short one."
    assert all(len(c) <= 120 for c in chunks)
    assert " ".join(chunks).split() == text.split()  # nothing lost or reordered
    assert all(c.endswith((",", ".")) for c in chunks)  # cut at clause ends


def test_a_word_longer_than_a_chunk_is_cut_to_fit():
    assert chunk_text("a" * 25 + " b", max_chars=10) == ["a" * 10, "a" * 10, "a" * 5 + " b"]


def speakable_chunks(text: str) -> list[str]:
    """``text``'s chunks, each checked as the manager checks one generation's text."""
    chunks = chunk_text(text)
    for chunk in chunks:
        assert len(chunk) <= longform.CHUNK_CHARS
        check_text(chunk)  # raises TextError: too long, or nothing to speak
    return chunks


def test_punctuation_that_fits_nowhere_is_not_a_chunk_of_its_own():
    # "?!" fits with neither neighbour: alone it was a chunk with nothing to speak.
    text = "?! " + "word " * 59 + "end."
    assert speakable_chunks(text) == [text[3:]]
    # Where it fits, it stays with its neighbour.
    assert speakable_chunks("Hi. ?! " + "word " * 59 + "end.")[0] == "Hi. ?!"


def test_a_url_longer_than_the_model_takes_is_cut():
    url = "https://example.com/" + "a" * 1116
    chunks = speakable_chunks(f"See {url} and more words.")
    assert "".join(chunks).replace(" ", "") == f"See{url}andmorewords."


@pytest.mark.parametrize("sentence", ["这是一个很长的中文句子，没有空格。",
                                      "全角の感嘆符です！", "これは質問ですか？"])
def test_cjk_text_is_split_at_its_own_sentence_marks(sentence):
    text = sentence * 40
    chunks = speakable_chunks(text)
    assert len(chunks) > 1 and all(c.endswith(sentence[-1]) for c in chunks)
    assert "".join(chunks).replace(" ", "") == text
    assert split_sentences(sentence * 2) == [sentence, sentence]


def test_cjk_clauses_and_text_without_any_mark_still_fit():
    clauses = "这是一个很长的从句，" * 40 + "完。"  # one sentence of 401 characters
    chunks = speakable_chunks(clauses)
    assert len(chunks) > 1 and all(c.endswith(("，", "。")) for c in chunks)
    unmarked = "没有标点符号的文字" * 80
    chunks = speakable_chunks(unmarked)
    assert len(chunks) == 3 and "".join(chunks) == unmarked


def test_an_abbreviation_after_a_bracket_does_not_end_a_sentence():
    assert split_sentences("Fruit (e.g. apples) is good. So are nuts.") == [
        "Fruit (e.g. apples) is good.", "So are nuts."]


def test_crossfade_removes_the_step_at_a_join():
    sr = 24000
    a, b = np.full(sr, 0.5, np.float32), np.full(sr, -0.5, np.float32)
    assert np.abs(np.diff(np.concatenate([a, b]))).max() == pytest.approx(1.0)
    joined = crossfade_join([a, b], sr)
    assert len(joined) == 2 * sr - int(longform.CROSSFADE_S * sr)
    assert np.abs(np.diff(joined)).max() < 0.001


def test_long_text_is_chunked_joined_without_clicks_and_seeded(tiny_manager, monkeypatch):
    computed = []
    library = tiny_manager.library
    real = library.conditionals

    def counting(voice, cached=True):
        conds, source = real(voice, cached=cached)
        computed.append(source)
        return conds, source

    monkeypatch.setattr(library, "conditionals", counting)
    text = " ".join(f"This is sentence number {i}, which says a little more." for i in range(15))
    params = GenerationParams(seed=5, max_new_tokens=20)
    tiny_manager.apply_preset("baseline")
    try:
        first = tiny_manager.generate_long(text, "calm-mid", params)
        second = tiny_manager.generate_long(text, "calm-mid", params)
    finally:
        tiny_manager.apply_preset("cached")
    chunks = first.report["chunks"]
    assert len(chunks) == len(chunk_text(text)) >= 3
    assert first.report["preset"] == "baseline"
    # baseline recomputes conditionals per call, but only once per long text
    assert computed.count("computed") == 2 and len(computed) == 2 * len(chunks)
    assert np.array_equal(first.wav, second.wav)
    # No jump at a join larger than the largest jump inside the chunks.
    sr = first.sample_rate
    lengths = [c["samples"] for c in chunks]
    overlap = int(longform.CROSSFADE_S * sr)
    joins, position = [], 0
    for length in lengths[:-1]:
        position += length - overlap
        joins.append(position)
    jumps = np.abs(np.diff(first.wav))
    near_joins = np.zeros(len(jumps), bool)
    for join in joins:
        near_joins[max(0, join - overlap - 2): join + 2] = True
    assert jumps[near_joins].max() <= jumps[~near_joins].max()
