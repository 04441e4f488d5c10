import copy
import gc
import json
import logging
import shutil
import time
import weakref

import numpy as np
import pytest
import torch
from chatterbox.models.t3 import T3
from chatterbox.models.t3.modules.t3_config import T3Config
from chatterbox.models.tokenizers import EnTokenizer
from chatterbox.tts import ChatterboxTTS, Conditionals
from conftest import VOICES_DIR
from safetensors.torch import load_file, save_file

from chatterbox_demo import weights
from chatterbox_demo.config import GenerationParams
from chatterbox_demo.manager import ModelManager

# --- parse_source ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("auto", ("auto", None)),
        ("hub", ("hub", None)),
        ("random", ("random", None)),
        ("tiny", ("tiny", None)),
        ("  tiny  ", ("tiny", None)),
        ("", ("auto", None)),
        (None, ("auto", None)),
        ("local:/models/chatterbox", ("local", "/models/chatterbox")),
        ("local:relative/dir", ("local", "relative/dir")),
    ],
)
def test_parse_source_valid(spec, expected):
    assert weights.parse_source(spec) == expected


def test_parse_source_local_without_directory():
    with pytest.raises(ValueError, match=r"local: needs a directory, e\.g\. --weights local:"):
        weights.parse_source("local:")


@pytest.mark.parametrize("spec", ["huggingface", "Tiny", "local", "file:/x", "random:3"])
def test_parse_source_unknown_lists_choices(spec):
    with pytest.raises(ValueError) as info:
        weights.parse_source(spec)
    message = str(info.value)
    assert repr(spec) in message
    assert "available: auto, hub, local:DIR, random, tiny" in message


def test_load_refuses_unknown_source_before_building():
    with pytest.raises(ValueError, match="Unknown weights source"):
        weights.load("bogus", "cpu")


# --- tokenizer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    weights.write_tokenizer_json(path)
    return path


def test_a_tokenizer_that_cannot_be_written_is_an_os_error(tmp_path):
    """The tokenizers library raises a bare Exception ("File too large (os error 27)" on a
    full disk): the CLI printed a traceback instead of its one line."""
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OSError, match="Could not write the tokenizer"):
        weights.write_tokenizer_json(tmp_path / "a-file" / "tokenizer.json")


def test_tokenizer_json_has_upstream_ids(tokenizer_path):
    tok = EnTokenizer(str(tokenizer_path))  # upstream asserts [START] and [STOP] exist
    vocab = tok.tokenizer.get_vocab()
    assert len(vocab) == weights.TEXT_VOCAB_SIZE == 704
    assert sorted(vocab.values()) == list(range(704))  # dense ids, nothing past the table
    assert vocab["[STOP]"] == 0
    assert vocab["[START]"] == 255
    hp = T3Config.english_only()
    assert (hp.stop_text_token, hp.start_text_token, hp.text_tokens_dict_size) == (0, 255, 704)
    for special in ("[UNK]", "[SPACE]", "[PAD]", "[SEP]", "[CLS]", "[MASK]"):
        assert special in vocab
    # Written atomically: only the target file is left.
    assert [p.name for p in tokenizer_path.parent.iterdir()] == ["tokenizer.json"]


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! It's 3:45 p.m. on 12/25/2024 -- 100% (really?) #1 @home; ~$5.",
        "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG 0123456789",
        'She said: "No." [pause] {brace} <tag> a_b a+b=c back\\slash `tick` |pipe|',
        "the end",
    ],
)
def test_tokenizer_encodes_english_text(tokenizer_path, text):
    tok = EnTokenizer(str(tokenizer_path))
    ids = tok.encode(text)
    assert ids and all(0 <= i < 704 for i in ids)
    assert tok.tokenizer.token_to_id("[UNK]") not in ids  # every ASCII character is known
    assert tok.decode(ids) == text  # lossless for ASCII
    tensor = tok.text_to_tokens(text)
    assert tensor.shape == (1, len(ids)) and tensor.dtype == torch.int32


def test_tokenizer_survives_non_ascii(tokenizer_path):
    tok = EnTokenizer(str(tokenizer_path))
    ids = tok.encode("Café naïve — “quotes” 😀")
    unk = tok.tokenizer.token_to_id("[UNK]")
    assert unk in ids and all(0 <= i < 704 for i in ids)


def test_tokenizer_merges_make_text_shorter(tokenizer_path):
    tok = EnTokenizer(str(tokenizer_path))
    text = "the rain in spain stays mainly in the plain"
    assert len(tok.encode(text)) < len(text)


# --- tiny build -----------------------------------------------------------------------------


def _state(module):
    # T3.inference adds ``patched_model``: an alias of T3's own parameters, not weights.
    return {k: v.detach().cpu() for k, v in module.state_dict().items()
            if not k.startswith("patched_model.")}


def _assert_same_state(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _differs(a, b):
    sa, sb = _state(a), _state(b)
    return any(not torch.equal(sa[k], sb[k]) for k in sa if sa[k].is_floating_point())


def test_tiny_build_is_deterministic_for_a_seed(tiny_manager):
    tts = tiny_manager.loaded.tts  # built by the manager with seed 0, earlier in the session
    t3, s3gen, ve = weights.build_modules("tiny", seed=0)
    _assert_same_state(t3, tts.t3)
    _assert_same_state(s3gen, tts.s3gen)
    _assert_same_state(ve, tts.ve)
    # The tiny build is really smaller than the full architecture, with the same interfaces.
    assert t3.cfg.num_hidden_layers == 2
    assert t3.hp.text_tokens_dict_size == 704
    del t3, s3gen, ve
    other = weights.build_modules("tiny", seed=1)
    for new, old in zip(other, (tts.t3, tts.s3gen, tts.ve), strict=True):
        assert _differs(new, old), type(new).__name__


def test_build_modules_unknown_arch():
    with pytest.raises(ValueError, match="Unknown architecture 'huge'; available: full, tiny"):
        weights.build_modules("huge")


def test_tiny_loaded_weights_describe_themselves(tiny_manager):
    loaded = tiny_manager.loaded
    assert (loaded.source, loaded.arch) == ("tiny", "tiny")
    assert loaded.identity.startswith("tiny:seed=0:chatterbox=")
    assert loaded.banner and "noise" in loaded.banner
    assert loaded.tts.conds is None  # random weights ship no built-in voice
    assert loaded.tts.sr == 24000


def _tiny_hp():
    hp = T3Config.english_only()
    hp.llama_config_name = weights.TINY_LLAMA
    return hp


# --- local: round trip ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_manager, tmp_path_factory):
    """The session's tiny model written in the upstream layout, with a built-in voice
    (conds.pt) made from the calm-mid clip. It has generated before it is written, as a
    model in use has (T3 then carries an extra ``patched_model`` submodule)."""
    tiny_manager.generate("Warm up.", "calm-mid", GenerationParams(max_new_tokens=8))
    assert hasattr(tiny_manager.loaded.tts.t3, "patched_model")
    tts = copy.copy(tiny_manager.loaded.tts)
    voice = tiny_manager.library.get("calm-mid")
    tts.conds = tiny_manager._compute_conditionals(voice.audio, 0.5)
    directory = tmp_path_factory.mktemp("tiny-ckpt") / "model"
    assert weights.write_checkpoint(tts, directory, arch="tiny") == directory
    return directory


@pytest.fixture(scope="module")
def local_manager(tiny_checkpoint, tmp_path_factory):
    manager = ModelManager(f"local:{tiny_checkpoint}", device="cpu",
                           cache_dir=tmp_path_factory.mktemp("local-cache"),
                           shipped_voices=VOICES_DIR)
    manager.load()
    manager.apply_preset("cached")  # the same pipeline as tiny_manager's, bit for bit
    yield manager
    manager.loaded = manager._library = None
    manager._t3_variants.clear()
    manager._s3gen_variants.clear()
    gc.collect()


def test_write_checkpoint_upstream_layout(tiny_checkpoint):
    names = sorted(p.name for p in tiny_checkpoint.iterdir())
    # Exactly a fresh T3's keys: strict loaders (upstream from_local) accept the file.
    t3_keys = set(load_file(tiny_checkpoint / "t3_cfg.safetensors"))
    assert t3_keys == set(T3(_tiny_hp()).state_dict())
    assert names == sorted([*weights.CHECKPOINT_FILES, weights.BUILTIN_VOICE_FILE,
                            weights.ARCH_FILE])
    assert json.loads((tiny_checkpoint / weights.ARCH_FILE).read_text()) == {"arch": "tiny"}
    # conds.pt is a tensors-only file that upstream's loader (weights_only) reads.
    conds = Conditionals.load(tiny_checkpoint / "conds.pt")
    assert conds.t3.speaker_emb.shape == (1, 256)
    assert float(conds.t3.emotion_adv.reshape(-1)[0]) == 0.5


def test_write_checkpoint_without_conds_has_no_conds_file(tiny_manager, tmp_path):
    tts = copy.copy(tiny_manager.loaded.tts)
    assert tts.conds is None
    # Write only the small voice encoder's neighbours: patch the big modules out for speed.
    tts.t3 = torch.nn.Linear(1, 1)
    tts.s3gen = torch.nn.Linear(1, 1)
    weights.write_checkpoint(tts, tmp_path, arch="tiny")
    assert not (tmp_path / weights.BUILTIN_VOICE_FILE).exists()
    assert all((tmp_path / name).is_file() for name in weights.CHECKPOINT_FILES)


def test_rewriting_a_checkpoint_removes_what_no_longer_applies(tiny_manager, tmp_path):
    tts = copy.copy(tiny_manager.loaded.tts)
    tts.t3 = torch.nn.Linear(1, 1)  # small stand-ins: only which files are written matters
    tts.s3gen = torch.nn.Linear(1, 1)
    tts.conds = tiny_manager._compute_conditionals(VOICES_DIR / "calm-mid.wav", 0.5)
    weights.write_checkpoint(tts, tmp_path, arch="tiny")
    assert (tmp_path / weights.BUILTIN_VOICE_FILE).exists()
    assert (tmp_path / weights.ARCH_FILE).exists()
    # The same directory, now a full-size model without a built-in voice: loaded from it,
    # the model must not claim the earlier one's voice, nor its tiny architecture.
    tts.conds = None
    weights.write_checkpoint(tts, tmp_path, arch="full")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(weights.CHECKPOINT_FILES)


def test_local_round_trip_gives_identical_weights(tiny_manager, local_manager, tiny_checkpoint):
    loaded = local_manager.loaded
    assert (loaded.source, loaded.arch, loaded.banner) == ("local", "tiny", None)
    assert loaded.identity.startswith(f"local:{tiny_checkpoint.resolve()}#")
    original = tiny_manager.loaded.tts
    _assert_same_state(loaded.tts.t3, original.t3)
    _assert_same_state(loaded.tts.s3gen, original.s3gen)
    _assert_same_state(loaded.tts.ve, original.ve)
    assert loaded.tts.tokenizer.encode("Hello there, 42!") == original.tokenizer.encode(
        "Hello there, 42!")


def test_local_round_trip_gives_identical_audio(tiny_manager, local_manager):
    params = GenerationParams(seed=11, max_new_tokens=12)
    text = "Round trip through the upstream layout."
    want = tiny_manager.generate(text, "calm-mid", params)
    # Conditionals computed by the reloaded weights from the same clip ...
    got = local_manager.generate(text, "calm-mid", params)
    assert got.report["voice"]["source"] == "memory"
    assert got.wav.shape == want.wav.shape and got.wav.size > 0
    assert np.array_equal(got.wav, want.wav)
    # ... and the built-in voice read back from conds.pt.
    names = {v.name: v.kind for v in local_manager.list_voices()}
    assert names["builtin"] == "builtin"
    builtin = local_manager.generate(text, "builtin", params)
    assert np.array_equal(builtin.wav, want.wav)
    # A different seed is a different sample: the comparison above is not vacuous.
    other = local_manager.generate(text, "calm-mid", GenerationParams(seed=12, max_new_tokens=12))
    assert not np.array_equal(other.wav[: min(len(other.wav), len(want.wav))],
                              want.wav[: min(len(other.wav), len(want.wav))])


@pytest.mark.parametrize("missing", weights.CHECKPOINT_FILES)
def test_local_missing_file_is_named(tmp_path, missing):
    for name in weights.CHECKPOINT_FILES:
        if name != missing:
            (tmp_path / name).write_bytes(b"placeholder")
    with pytest.raises(FileNotFoundError) as info:
        weights.load(f"local:{tmp_path}", "cpu")
    message = str(info.value)
    assert f"lacks {missing};" in message
    assert str(tmp_path) in message
    for name in weights.CHECKPOINT_FILES:
        assert name in message  # the layout it needs is spelled out


def test_local_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        weights.load(f"local:{tmp_path / 'nope'}", "cpu")


def test_local_unknown_arch_marker(tmp_path):
    for name in weights.CHECKPOINT_FILES:
        (tmp_path / name).write_bytes(b"placeholder")
    (tmp_path / weights.ARCH_FILE).write_text('{"arch": "huge"}')
    with pytest.raises(ValueError, match="unknown architecture 'huge'"):
        weights.load(f"local:{tmp_path}", "cpu")


def test_local_identity_changes_when_a_file_is_replaced(tmp_path):
    for name in weights.CHECKPOINT_FILES:
        (tmp_path / name).write_bytes(b"v1")
    first = weights._files_fingerprint(tmp_path)
    assert first == weights._files_fingerprint(tmp_path)
    (tmp_path / "t3_cfg.safetensors").write_bytes(b"version 2")
    assert weights._files_fingerprint(tmp_path) != first


def _linked_copy(checkpoint, directory):
    """``checkpoint``'s files linked into ``directory``: a copy to damage one file of
    without writing the whole checkpoint again."""
    directory.mkdir()
    for path in checkpoint.iterdir():
        (directory / path.name).symlink_to(path)
    return directory


def _replace(path, content: bytes):
    path.unlink()
    path.write_bytes(content)


@pytest.mark.parametrize("name, damage", [
    ("t3_cfg.safetensors", lambda path: _replace(path, path.read_bytes()[:1000])),
    ("s3gen.safetensors", lambda path: _replace(path, b"")),
    ("tokenizer.json", lambda path: _replace(path, b"not json")),
    ("conds.pt", lambda path: _replace(path, b"garbage")),
    (weights.ARCH_FILE, lambda path: _replace(path, b'{"arch": "tin')),
])
def test_local_damaged_file_is_named(tiny_checkpoint, tmp_path, name, damage):
    """A file cut short or not what its name says gave the reader's traceback
    (SafetensorError, UnpicklingError...) and the CLI exited 1; now a ValueError, which the
    CLI prints as one line and the page as a message."""
    directory = _linked_copy(tiny_checkpoint, tmp_path / "model")
    damage(directory / name)
    with pytest.raises(ValueError) as info:
        weights.load(f"local:{directory}", "cpu")
    message = str(info.value)
    assert f"{directory / name} is damaged or incomplete" in message
    assert len(message.splitlines()) == 1


def test_local_weights_of_another_shape_name_the_file(tiny_checkpoint, tmp_path):
    directory = _linked_copy(tiny_checkpoint, tmp_path / "model")
    state = load_file(tiny_checkpoint / "ve.safetensors")
    (directory / "ve.safetensors").unlink()
    save_file({k: v[..., :1].contiguous() for k, v in state.items()},
              directory / "ve.safetensors")
    with pytest.raises(ValueError, match=r"ve\.safetensors does not fit the tiny architecture "
                                         r"\(size mismatch for "):
        weights.load(f"local:{directory}", "cpu")


@pytest.mark.slow
def test_local_tiny_checkpoint_without_marker_says_so(tiny_checkpoint, tmp_path):
    """Loaded as full-size (the marker is what says tiny), T3 fits nowhere; the message
    must point at the missing marker, not only at a size mismatch."""
    directory = _linked_copy(tiny_checkpoint, tmp_path / "model")
    (directory / weights.ARCH_FILE).unlink()
    with pytest.raises(ValueError, match=r"t3_cfg\.safetensors does not fit the full-size "
                                         r".*chatterbox_demo_arch\.json is missing"):
        weights.load(f"local:{directory}", "cpu")


def test_local_arch_marker_that_is_not_an_object(tmp_path):
    for name in weights.CHECKPOINT_FILES:
        (tmp_path / name).write_bytes(b"placeholder")
    (tmp_path / weights.ARCH_FILE).write_text('["tiny"]')
    with pytest.raises(ValueError, match=r"names unknown architecture \['tiny'\]"):
        weights.load(f"local:{tmp_path}", "cpu")


def test_local_path_that_is_a_file(tmp_path):
    (tmp_path / "model").write_text("x")
    with pytest.raises(ValueError, match="is a file; local: needs the directory"):
        weights.load(f"local:{tmp_path / 'model'}", "cpu")


def test_local_identity_ignores_the_builtin_voice(tmp_path):
    """conds.pt is a voice, not weights: adding it must not make every cached voice and
    every adapter trained on the folder stale."""
    for name in weights.CHECKPOINT_FILES:
        (tmp_path / name).write_bytes(b"v1")
    first = weights._files_fingerprint(tmp_path)
    (tmp_path / weights.BUILTIN_VOICE_FILE).write_bytes(b"a voice")
    assert weights._files_fingerprint(tmp_path) == first


# --- auto / hub -----------------------------------------------------------------------------


def test_auto_falls_back_to_random_when_hub_unreachable(monkeypatch, caplog):
    hub_calls, random_calls = [], []
    sentinel = object()

    def unreachable():
        hub_calls.append("download")
        raise OSError("Hub unreachable (test)")

    def fake_random(arch, device, seed):
        random_calls.append((arch, device, seed))
        return sentinel

    monkeypatch.setattr(weights, "_download_hub", unreachable)
    monkeypatch.setattr(weights, "_load_random", fake_random)
    with caplog.at_level(logging.WARNING, logger="chatterbox_demo.weights"):
        assert weights.load("auto", "cpu", seed=7) is sentinel
    assert hub_calls == ["download"]
    assert random_calls == [("full", "cpu", 7)]  # the real architecture, not the tiny one
    assert "Hub not reachable" in caplog.text and "Hub unreachable (test)" in caplog.text
    # An explicit `hub` never falls back silently.
    with pytest.raises(OSError, match="Hub unreachable"):
        weights.load("hub", "cpu")
    assert random_calls == [("full", "cpu", 7)]


def test_auto_offline_gives_banner_through_real_hub_path(tiny_manager, monkeypatch, tmp_path,
                                                         caplog):
    """The real ``_download_hub`` under HF_HUB_OFFLINE with an empty cache fails, and the real
    ``_load_random`` marks the result as noise. ``build_modules`` hands back the session's
    tiny modules so the full model is not built again."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    built = []
    tts = tiny_manager.loaded.tts

    def fake_build(arch, seed=None):
        built.append((arch, seed))
        return tts.t3, tts.s3gen, tts.ve

    monkeypatch.setattr(weights, "build_modules", fake_build)
    with pytest.raises(Exception, match="(?i)offline|cannot find"):
        weights._download_hub()
    with caplog.at_level(logging.WARNING):
        manager = ModelManager("auto", device="cpu", cache_dir=tmp_path / "cache",
                               shipped_voices=None, seed=3)
        loaded = manager.load()
    assert built == [("full", 3)]
    assert (loaded.source, loaded.arch) == ("random", "full")
    assert loaded.banner == weights.OFFLINE_BANNER
    assert loaded.identity.startswith("full:seed=3:chatterbox=")
    assert manager.status()["banner"] == weights.OFFLINE_BANNER
    assert weights.OFFLINE_BANNER in caplog.text  # the user is told, not just the UI


def test_auto_reports_a_damaged_hub_download(tiny_checkpoint, monkeypatch, tmp_path):
    """A file cut short in the Hub cache is not "Hub not reachable": ``auto`` said so and
    served noise; now it names the file, and ``hub`` too."""
    import huggingface_hub.constants as hf_constants

    repo = tmp_path / "hub" / "models--ResembleAI--chatterbox"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in weights.CHECKPOINT_FILES:
        (snapshot / name).symlink_to(tiny_checkpoint / name)
    _replace(snapshot / "t3_cfg.safetensors", b"cut short")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(weights, "_load_random", lambda *args: pytest.fail("fell back"))
    for spec in ("auto", "hub"):
        with pytest.raises(ValueError, match=f"{snapshot / 't3_cfg.safetensors'} is damaged "
                                             f"or incomplete .*; delete {repo} to download"):
            weights.load(spec, "cpu")


# --- the full-size architecture -------------------------------------------------------------


@pytest.mark.slow
def test_full_size_local_round_trip_uses_upstream_from_local(tmp_path, monkeypatch,
                                                             tokenizer_path):
    started = time.perf_counter()
    calls = []
    upstream = ChatterboxTTS.from_local.__func__

    def spy(cls, ckpt_dir, device):
        calls.append((str(ckpt_dir), device))
        return upstream(cls, ckpt_dir, device)

    monkeypatch.setattr(ChatterboxTTS, "from_local", classmethod(spy))
    directory = tmp_path / "full"
    try:
        t3, s3gen, ve = weights.build_modules("full", seed=5)
        assert t3.cfg.num_hidden_layers == 30  # really the 520M Llama backbone
        built = ChatterboxTTS(t3, s3gen, ve, EnTokenizer(str(tokenizer_path)), "cpu")
        weights.write_checkpoint(built, directory, arch="full")
        assert not (directory / weights.ARCH_FILE).exists()  # indistinguishable from upstream
        assert sorted(p.name for p in directory.iterdir()) == sorted(weights.CHECKPOINT_FILES)

        loaded = weights.load(f"local:{directory}", "cpu")
        assert calls == [(str(directory), "cpu")]
        assert (loaded.source, loaded.arch) == ("local", "full")
        _assert_same_state(loaded.tts.t3, t3)
        _assert_same_state(loaded.tts.ve, ve)
        watch = [weakref.ref(m) for m in (t3, s3gen, ve, loaded.tts.t3, loaded.tts.s3gen)]
    finally:
        built = loaded = t3 = s3gen = ve = None
        shutil.rmtree(directory, ignore_errors=True)  # 3 GB: do not leave it in pytest's tmp
        gc.collect()
    assert all(ref() is None for ref in watch), "the full-size models were not freed"
    elapsed = time.perf_counter() - started
    print(f"full-size build + write + load: {elapsed:.1f} s")
    assert elapsed < 90, f"full-size round trip took {elapsed:.0f} s"
