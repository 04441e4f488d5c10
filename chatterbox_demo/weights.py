"""Where the model's weights come from: ``hub``, ``local:DIR``, ``random``, ``tiny``, ``auto``.

``hub`` and upstream-layout ``local:`` directories go through the package's own
``ChatterboxTTS.from_local``. ``random`` builds the real full-size architecture with seeded
random weights (for machines that cannot reach the Hub: timings are real, audio is noise).
``tiny`` builds the same upstream classes at reduced size so tests run in seconds on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import torch
from chatterbox.models.s3gen import S3Gen
from chatterbox.models.s3gen.decoder import ConditionalDecoder
from chatterbox.models.s3gen.f0_predictor import ConvRNNF0Predictor
from chatterbox.models.s3gen.hifigan import HiFTGenerator
from chatterbox.models.s3gen.transformer.upsample_encoder import (
    UpsampleConformerEncoder,
)
from chatterbox.models.t3 import T3
from chatterbox.models.t3.llama_configs import LLAMA_CONFIGS
from chatterbox.models.t3.modules.t3_config import T3Config
from chatterbox.models.tokenizers import EnTokenizer
from chatterbox.models.voice_encoder import VoiceEncoder
from chatterbox.tts import ChatterboxTTS, Conditionals
from s3tokenizer.model_v2 import AudioEncoderV2, FSQVectorQuantization
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .files import write_atomically

log = logging.getLogger(__name__)

HUB_REPO = "ResembleAI/chatterbox"
CHECKPOINT_FILES = (
    "ve.safetensors",
    "t3_cfg.safetensors",
    "s3gen.safetensors",
    "tokenizer.json",
)
BUILTIN_VOICE_FILE = "conds.pt"
# Written next to checkpoints we export from the tiny architecture. Upstream checkpoints
# never have it, so its absence means "the full-size upstream architecture".
ARCH_FILE = "chatterbox_demo_arch.json"
SOURCES = ("auto", "hub", "local:DIR", "random", "tiny")
OFFLINE_BANNER = "offline: real architecture, random weights; audio is noise, timings are real"

TEXT_VOCAB_SIZE = 704  # upstream EnTokenizer vocabulary; T3Config.text_tokens_dict_size
TINY_LLAMA = "chatterbox_demo_tiny"
# The perceiver resampler in T3's conditioning encoder is built at width 1024 whatever the
# config says, so the tiny Llama keeps hidden_size 1024 and saves its time on depth.
LLAMA_CONFIGS[TINY_LLAMA] = {
    **LLAMA_CONFIGS["Llama_520M"],
    "num_hidden_layers": 2,
    "intermediate_size": 1024,
}


@dataclass
class LoadedWeights:
    """A ready model plus what the rest of the app needs to know about where it came from."""

    tts: ChatterboxTTS
    source: str  # "hub", "local", "random" or "tiny"
    identity: str  # keys the on-disk conditionals cache: different weights, different key
    arch: str  # "full" or "tiny"
    banner: str | None = None  # set when the audio will be noise (random weights)


def parse_source(spec: str) -> tuple[str, str | None]:
    """Split a ``CHATTERBOX_WEIGHTS`` value into (kind, directory)."""
    spec = (spec or "auto").strip()
    if spec.startswith("local:"):
        directory = spec[len("local:") :]
        if not directory:
            raise ValueError("local: needs a directory, e.g. --weights local:/models/chatterbox")
        return "local", directory
    if spec in ("auto", "hub", "random", "tiny"):
        return spec, None
    raise ValueError(f"Unknown weights source {spec!r}; available: {', '.join(SOURCES)}")


def load(spec: str, device: str, seed: int = 0) -> LoadedWeights:
    """Load the model named by ``spec`` onto ``device``."""
    kind, directory = parse_source(spec)
    if kind == "auto":
        try:
            snapshot = _download_hub()
        except HUB_UNREACHABLE as exc:
            log.warning("Hugging Face Hub not reachable (%s); using random weights", exc)
            return _load_random("full", device, seed)
        # Outside the try: a damaged download is the user's to fix, not a reason for noise.
        return _load_hub(snapshot, device)
    if kind == "hub":
        return _load_hub(_download_hub(), device)
    if kind == "local":
        return _load_local(Path(directory), device)
    return _load_random("tiny" if kind == "tiny" else "full", device, seed)


# What huggingface_hub raises when it cannot get the files: offline mode, no network and
# nothing cached (LocalEntryNotFoundError), HTTP errors (gated repo, Hub down) are all
# OSErrors; a connection lost during a download surfaces as an httpx error.
HUB_UNREACHABLE = (OSError, httpx.HTTPError)


def _download_hub() -> Path:
    # Imported here so that HF_HOME / HF_HUB_OFFLINE set by the caller are honoured.
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(HUB_REPO, allow_patterns=[*CHECKPOINT_FILES, BUILTIN_VOICE_FILE])
    )


def _load_hub(snapshot: Path, device: str) -> LoadedWeights:
    # The cache keeps the damaged file (re-running would not fetch it again): removing the
    # repo's cache folder makes the next run download it anew.
    remedy = f"delete {snapshot.parent.parent} to download the model again"
    tts = _from_checkpoint(snapshot, device, "full", remedy, remedy)
    # The snapshot folder is named after the commit, which pins the exact weights.
    return LoadedWeights(tts, "hub", f"hub:{HUB_REPO}@{snapshot.name}", "full")


def _load_local(directory: Path, device: str) -> LoadedWeights:
    if not directory.exists():
        raise FileNotFoundError(f"Weights directory {directory} does not exist")
    if not directory.is_dir():
        raise ValueError(f"Weights path {directory} is a file; local: needs the directory "
                         f"that holds {', '.join(CHECKPOINT_FILES)}")
    missing = [name for name in CHECKPOINT_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Weights directory {directory} lacks {', '.join(missing)}; it needs the upstream "
            f"layout: {', '.join(CHECKPOINT_FILES)} and optionally {BUILTIN_VOICE_FILE}"
        )
    arch = _read_arch(directory)
    remedy = "download or copy it again"
    # A tiny checkpoint copied without its marker loads as full-size and fits nowhere.
    misfit_remedy = remedy if arch == "tiny" else (
        f"if the folder holds a tiny checkpoint, its {ARCH_FILE} is missing; otherwise {remedy}")
    tts = _from_checkpoint(directory, device, arch, remedy, misfit_remedy)
    return LoadedWeights(tts, "local", f"local:{_files_fingerprint(directory)}", arch)


def _read_arch(directory: Path) -> str:
    marker = directory / ARCH_FILE
    if not marker.exists():
        return "full"
    with _reading(marker, "write it again or delete it for a full-size checkpoint"):
        content = json.loads(marker.read_text())
    arch = content.get("arch") if isinstance(content, dict) else content
    if arch not in ("full", "tiny"):
        raise ValueError(f"{marker} names unknown architecture {arch!r}; it should hold "
                         '{"arch": "tiny"}, or be deleted for a full-size checkpoint')
    return arch


@contextmanager
def _reading(path: Path, remedy: str):
    """Report a file whose content its reader cannot make sense of as damaged, naming it.

    Each reader has its own error for that (safetensors' SafetensorError, the tokenizers
    library's bare Exception, torch's UnpicklingError, json's ValueError), so anything but
    an OSError counts; an OSError (missing, unreadable) already names the file.
    """
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        reason = _first_line(exc)
        raise ValueError(f"Weights file {path} is damaged or incomplete ({reason}); "
                         f"{remedy}") from exc


# Which checkpoint file holds each module, to name it when its shapes do not fit.
MODULE_FILES = {"VoiceEncoder": "ve.safetensors", "T3": "t3_cfg.safetensors",
                "S3Gen": "s3gen.safetensors"}


def _first_line(exc: Exception, limit: int = 120) -> str:
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0].strip()
    return line if len(line) <= limit else line[:limit] + "..."


def _from_checkpoint(directory: Path, device: str, arch: str, remedy: str,
                     misfit_remedy: str) -> ChatterboxTTS:
    """The model in ``directory``; a damaged file or one made for another architecture is
    a ValueError naming it, where the loaders would give a traceback."""
    # The loaders below read every file whole and cannot say which one failed, so each is
    # opened first: safetensors checks only the header against the size, which is cheap.
    for name in ("ve.safetensors", "t3_cfg.safetensors", "s3gen.safetensors"):
        with _reading(directory / name, remedy), safe_open(directory / name, "pt"):
            pass
    with _reading(directory / "tokenizer.json", remedy):
        EnTokenizer(str(directory / "tokenizer.json"))
    if (directory / BUILTIN_VOICE_FILE).exists():
        with _reading(directory / BUILTIN_VOICE_FILE,
                      f"{remedy}, or delete it (it only holds the built-in voice)"):
            Conditionals.load(directory / BUILTIN_VOICE_FILE, map_location="cpu")
    try:
        if arch == "full":
            return ChatterboxTTS.from_local(directory, device)
        return _from_local_tiny(directory, device)
    except RuntimeError as exc:
        # load_state_dict's message: "Error(s) in loading state_dict for T3:\n\tsize ..."
        lines = str(exc).splitlines()
        module = lines[0].removeprefix("Error(s) in loading state_dict for ").rstrip(":")
        if module not in MODULE_FILES:
            raise
        size = "full-size" if arch == "full" else arch
        raise ValueError(
            f"Weights file {directory / MODULE_FILES[module]} does not fit the {size} "
            f"architecture ({_first_line(lines[-1])}); {misfit_remedy}"
        ) from exc


def _from_local_tiny(directory: Path, device: str) -> ChatterboxTTS:
    """Upstream ``from_local`` step for step, but building the tiny modules."""
    t3, s3gen, ve = build_modules("tiny")
    ve.load_state_dict(load_file(directory / "ve.safetensors"))
    t3.load_state_dict(load_file(directory / "t3_cfg.safetensors"))
    # strict=False as upstream: the S3 tokenizer's mel filters and window are not saved.
    s3gen.load_state_dict(load_file(directory / "s3gen.safetensors"), strict=False)
    conds = None
    if (directory / BUILTIN_VOICE_FILE).exists():
        conds = Conditionals.load(directory / BUILTIN_VOICE_FILE, map_location="cpu")
        conds = conds.to(device)
    tokenizer = EnTokenizer(str(directory / "tokenizer.json"))
    return ChatterboxTTS(
        t3.to(device).eval(), s3gen.to(device).eval(), ve.to(device).eval(),
        tokenizer, device, conds=conds,
    )


def _files_fingerprint(directory: Path) -> str:
    """Names, sizes and modification times of the weight files: cheap, and it changes
    whenever a file is replaced (hashing 3 GB of weights on every start would not be).
    The optional conds.pt is left out: it holds a built-in voice, not weights, and adding
    it must not recompute every voice's conditionals or refuse adapters trained here."""
    digest = hashlib.sha256()
    for name in CHECKPOINT_FILES:
        path = directory / name
        if path.exists():
            stat = path.stat()
            digest.update(f"{name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return f"{directory.resolve()}#{digest.hexdigest()[:16]}"


def _load_random(arch: str, device: str, seed: int) -> LoadedWeights:
    log.info("Building the %s architecture with random weights (seed %d)", arch, seed)
    t3, s3gen, ve = build_modules(arch, seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        write_tokenizer_json(path)
        tokenizer = EnTokenizer(str(path))
    tts = ChatterboxTTS(
        t3.to(device).eval(), s3gen.to(device).eval(), ve.to(device).eval(),
        tokenizer, device,
    )
    # The random init depends on these versions, so they are part of the identity.
    import chatterbox

    identity = f"{arch}:seed={seed}:chatterbox={chatterbox.__version__}:torch={torch.__version__}"
    banner = OFFLINE_BANNER if arch == "full" else (
        "tiny test model with random weights: audio is noise, timings are not representative"
    )
    return LoadedWeights(tts, arch if arch == "tiny" else "random", identity, arch, banner)


def build_modules(arch: str, seed: int | None = None) -> tuple[T3, S3Gen, VoiceEncoder]:
    """Build T3, S3Gen and the voice encoder with freshly initialised weights."""
    if seed is not None:
        torch.manual_seed(seed)
    if arch == "full":
        return T3(), S3Gen(), VoiceEncoder()
    if arch != "tiny":
        raise ValueError(f"Unknown architecture {arch!r}; available: full, tiny")
    hp = T3Config.english_only()
    hp.llama_config_name = TINY_LLAMA
    return T3(hp), _tiny_s3gen(), VoiceEncoder()


def _tiny_s3gen() -> S3Gen:
    """S3Gen with its heavy parts rebuilt small where their constructors take sizes.

    The S3 tokenizer, the flow's conformer encoder, the CFM estimator and the HiFT vocoder
    keep their input/output shapes (128 mel bins, 512-d token embeddings, 80 mel bins out,
    24 kHz with 480 samples per mel frame) so every upstream code path still runs.
    """
    s3gen = S3Gen()
    # 64 is the rotary dimension AudioEncoderV2 hard-codes, so head_dim stays 64.
    s3gen.tokenizer.encoder = AudioEncoderV2(128, 128, 2, 1, 2, False)
    s3gen.tokenizer.quantizer = FSQVectorQuantization(128, 3**8)
    s3gen.flow.encoder = UpsampleConformerEncoder(
        output_size=512, attention_heads=8, linear_units=256, num_blocks=1,
        input_layer="linear", pos_enc_layer_type="rel_pos_espnet",
        selfattention_layer_type="rel_selfattn", input_size=512,
    )
    s3gen.flow.decoder.estimator = ConditionalDecoder(
        in_channels=320, out_channels=80, causal=True, channels=[64], dropout=0.0,
        attention_head_dim=32, n_blocks=1, num_mid_blocks=1, num_heads=2, act_fn="gelu",
    )
    s3gen.mel2wav = HiFTGenerator(
        sampling_rate=24000,
        base_channels=32,
        upsample_rates=[8, 5, 3],
        upsample_kernel_sizes=[16, 11, 7],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1]],
        source_resblock_kernel_sizes=[7, 7, 11],
        source_resblock_dilation_sizes=[[1], [1], [1]],
        f0_predictor=ConvRNNF0Predictor(cond_channels=32),
    )
    return s3gen


# T3.inference registers ``patched_model``, a wrapper sharing T3's own parameters; saving
# it would fail (shared tensors) and no loader expects its keys.
DERIVED_PREFIX = "patched_model."


def checkpoint_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s weights as the upstream checkpoint files hold them."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()
            if not k.startswith(DERIVED_PREFIX)}


def write_checkpoint(tts: ChatterboxTTS, directory: Path, arch: str) -> Path:
    """Write ``tts`` in the upstream checkpoint layout (plus our arch marker when tiny).
    Over an earlier checkpoint, the files that no longer apply are removed: a model loaded
    from it would otherwise claim that one's built-in voice or architecture."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for module, name in ((tts.ve, "ve"), (tts.t3, "t3_cfg"), (tts.s3gen, "s3gen")):
        write_atomically(directory / f"{name}.safetensors",
                         partial(save_file, checkpoint_state(module)))
    write_tokenizer_json(directory / "tokenizer.json")
    if tts.conds is not None:
        write_atomically(directory / BUILTIN_VOICE_FILE, tts.conds.save)
    else:
        (directory / BUILTIN_VOICE_FILE).unlink(missing_ok=True)
    if arch != "full":
        marker = json.dumps({"arch": arch}) + "\n"
        write_atomically(directory / ARCH_FILE, lambda tmp: tmp.write_text(marker))
    else:
        (directory / ARCH_FILE).unlink(missing_ok=True)
    return directory


def write_tokenizer_json(path: Path) -> None:
    """Write a ``tokenizer.json`` with the upstream vocabulary size and special-token ids.

    Only the ids the model depends on are upstream's ([STOP]=0, [START]=255, 704 entries);
    the rest is a character vocabulary plus letter-pair merges, enough to tokenize any
    English text for random or tiny weights.
    """
    from tokenizers import Tokenizer, models

    special = {"[STOP]": 0, "[UNK]": 1, "[SPACE]": 2, "[PAD]": 3, "[SEP]": 4,
               "[CLS]": 5, "[MASK]": 6, "[START]": 255}
    free_ids = (i for i in range(TEXT_VOCAB_SIZE) if i not in special.values())
    vocab = dict(special)
    for ch in (chr(c) for c in range(33, 127)):  # printable ASCII without the space
        vocab[ch] = next(free_ids)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    merges = []
    for a in letters:
        for b in letters:
            if len(vocab) == TEXT_VOCAB_SIZE:
                break
            vocab[a + b] = next(free_ids)
            merges.append((a, b))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="[UNK]"))
    tokenizer.add_special_tokens(list(special))

    def save(tmp: Path) -> None:
        try:
            tokenizer.save(str(tmp))
        except Exception as exc:  # the library's I/O errors are bare Exceptions
            raise OSError(f"Could not write the tokenizer to {path}: {exc}") from None

    write_atomically(path, save)
