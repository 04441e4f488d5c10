"""Speaker fine-tuning of T3: LoRA adapters, a speaker-embedding offset, or all of T3.

Training is teacher forcing: T3 sees the speaker's conditioning, the transcript and the
clip's speech tokens shifted right, and learns to predict the next speech token
(cross-entropy; the text loss is optional). The pristine model is never touched: training
runs on a copy, and only the trainable parameters of the chosen method change.

An adapter directory holds::

    card.json                  base weights, method, settings, steps, losses, data hash
    conds.pt                   the speaker's conditionals (from the dataset's reference clip)
    adapter.safetensors        lora: each target Linear's A and B matrices
    speaker_offset.safetensors speaker-adapter: the offset added to the speaker embedding
    t3_cfg.safetensors         full: the whole T3, in the upstream checkpoint layout
    checkpoint.pt              training state (trainable weights, optimizer, step), to resume

It is written whole at the end of training: into a temporary folder beside it, which then
replaces it, so a run that fails leaves the previous adapter as it was (and only its
checkpoint.pt, which the run updates as it goes, is newer).

For generation a LoRA adapter is merged into a copy of T3's weights (W + B A alpha/r), so
it costs nothing per token; the speaker offset is baked into the voice's conditionals.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from chatterbox.models.t3.modules.cond_enc import T3Cond
from chatterbox.tts import Conditionals
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .config import RANGES, check_number
from .files import write_atomically
from .speaker_data import SpeakerData
from .weights import checkpoint_state

METHODS = ("lora", "speaker-adapter", "full")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CARD_VERSION = 1
FILES = {"lora": "adapter.safetensors", "speaker-adapter": "speaker_offset.safetensors",
         "full": "t3_cfg.safetensors"}
OUTPUTS = ("card.json", "conds.pt", "checkpoint.pt", *FILES.values())
START_OVER = "train again without --resume, which starts over and replaces the checkpoint"
WHOLE_COPY = "import a whole copy of the adapter directory that `finetune train` wrote"


class FinetuneError(ValueError):
    """Settings or an adapter directory that cannot be used; the message says why."""


@dataclass(frozen=True)
class TrainSettings:
    method: str = "lora"
    rank: int = 8
    alpha: float = 16.0
    target: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    steps: int = 200
    lr: float = 2e-4
    batch: int = 4  # clips per optimizer step (run one at a time, gradients summed)
    seed: int = 0
    gradient_checkpointing: bool = False
    val_fraction: float = 0.1
    text_loss_weight: float = 0.0
    exaggeration: float = 0.5
    checkpoint_every: int = 50

    def __post_init__(self):
        if self.method not in METHODS:
            raise FinetuneError(f"method must be one of {', '.join(METHODS)} "
                                f"(got {self.method!r})")
        unknown = [t for t in self.target if t not in LORA_TARGETS]
        if unknown or not self.target:
            raise FinetuneError(f"target must name some of {', '.join(LORA_TARGETS)} "
                                f"(got {','.join(self.target) or 'nothing'})")
        try:
            for name, low, high in (("rank", 1, 512), ("steps", 1, 1_000_000),
                                    ("batch", 1, 512), ("checkpoint_every", 1, 1_000_000),
                                    ("seed", *RANGES["seed"])):
                check_number(name, getattr(self, name), low, high, integer=True)
            for name, low, high in (("alpha", 1e-6, 1e6), ("lr", 1e-9, 1.0),
                                    ("val_fraction", 0.0, 0.5), ("text_loss_weight", 0.0, 10.0),
                                    ("exaggeration", *RANGES["exaggeration"])):
                check_number(name, getattr(self, name), low, high)
        except ValueError as exc:
            raise FinetuneError(str(exc)) from None


# --- the loss -------------------------------------------------------------------------------


def speaker_cond(conds: Conditionals, exaggeration: float, device,
                 offset: torch.Tensor | None = None) -> T3Cond:
    """A fresh T3Cond per forward pass (T3 caches the prompt embedding on the object, which
    would keep a freed graph alive), with the speaker-embedding offset when training one."""
    base = conds.t3
    speaker = base.speaker_emb.to(device)
    return T3Cond(speaker_emb=speaker if offset is None else speaker + offset,
                  cond_prompt_speech_tokens=base.cond_prompt_speech_tokens.to(device),
                  emotion_adv=exaggeration * torch.ones(1, 1, 1, device=device))


def example_loss(t3, cond: T3Cond, text_tokens: list[int], speech_tokens: list[int],
                 text_loss_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, speech cross-entropy) for one clip, teacher-forced as upstream
    decodes: [conditioning][start_text text stop_text][start_speech speech] predicting
    [speech stop_speech]."""
    hp, device = t3.hp, t3.device
    text = torch.tensor([[hp.start_text_token, *text_tokens, hp.stop_text_token]],
                        device=device)
    speech = torch.tensor([[hp.start_speech_token, *speech_tokens]], device=device)
    target = torch.tensor([*speech_tokens, hp.stop_speech_token], device=device)
    embeds, len_cond = t3.prepare_input_embeds(t3_cond=cond, text_tokens=text,
                                               speech_tokens=speech)
    hidden = t3.tfmr(inputs_embeds=embeds, use_cache=False).last_hidden_state
    speech_start = len_cond + text.shape[1]
    speech_loss = F.cross_entropy(t3.speech_head(hidden[0, speech_start:]), target)
    loss = speech_loss
    if text_loss_weight:
        text_logits = t3.text_head(hidden[0, len_cond: speech_start - 1])
        loss = loss + text_loss_weight * F.cross_entropy(text_logits, text[0, 1:])
    return loss, speech_loss.detach()


# --- the trainable parts per method ---------------------------------------------------------


def add_lora(t3, rank: int, alpha: float, target) -> list[torch.nn.Parameter]:
    """Wrap T3's target Linears with PEFT LoRA layers (B starts at zero, so the model is
    unchanged until trained); returns the new trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target),
                        lora_dropout=0.0, bias="none")
    inject_adapter_in_model(config, t3.tfmr)
    return [p for name, p in t3.tfmr.named_parameters() if "lora_" in name]


def lora_state(t3) -> dict[str, torch.Tensor]:
    """Each adapted Linear's matrices, keyed ``<module path>.lora_A`` / ``.lora_B``."""
    state = {}
    for name, tensor in t3.tfmr.state_dict().items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.default.weight"
            if name.endswith(marker):
                state[name[: -len(marker)] + f".{part}"] = tensor.detach().float().cpu()
    return state


def merge_lora(t3, state: dict[str, torch.Tensor], rank: int, alpha: float) -> None:
    """Add each adapter's B @ A * alpha / rank to its Linear's weight, in place (the state
    checked to fit first: :func:`adapted_t3`)."""
    modules = dict(t3.tfmr.named_modules())
    scale = alpha / rank
    for key in state:
        if key.endswith(".lora_A"):
            path = key[: -len(".lora_A")]
            weight = modules[path].weight
            delta = state[f"{path}.lora_B"] @ state[key] * scale
            with torch.no_grad():
                weight += delta.to(device=weight.device, dtype=weight.dtype)


# --- training -------------------------------------------------------------------------------


def split(data: SpeakerData, val_fraction: float, seed: int):
    """(train, validation) examples, the same for the same seed."""
    examples = sorted(data.examples, key=lambda e: e.id)
    random.Random(seed).shuffle(examples)
    held = round(len(examples) * val_fraction) if len(examples) > 1 else 0
    held = max(held, 1) if val_fraction > 0 and len(examples) > 1 else held
    return examples[held:], examples[:held]


def _example_for(train: list, position: int, seed: int):
    """The clip at ``position`` of an endless, per-epoch reshuffled order: a pure function
    of the position, so a resumed run sees exactly what an uninterrupted one would."""
    epoch, index = divmod(position, len(train))
    order = list(range(len(train)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return train[order[index]]


class _RandomState:
    """Training's own torch random state: LoRA's initialisation and the dropout in T3's
    conditioning encoder draw from it. Torch's generators are process-wide, and the page
    trains while generations run in other threads, which seed them and draw their samples
    from them. Each stretch of training that draws holds ``lock`` (the model's, which every
    generation holds throughout) with this state swapped in, and puts the process's back
    after: neither disturbs the other, so a seed gives the same adapter and the same audio
    whatever runs beside it."""

    def __init__(self, seed: int, lock) -> None:
        self.seed, self.lock = seed, lock
        self.state: dict | None = None  # as checkpoints store it: "rng", maybe "cuda_rng"

    @contextlib.contextmanager
    def drawing(self):
        with self.lock, torch.random.fork_rng():  # CUDA's generators too, where there are
            if self.state is None:
                torch.manual_seed(self.seed)
            else:
                torch.set_rng_state(self.state["rng"])
                if "cuda_rng" in self.state and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all(self.state["cuda_rng"])
            yield
            self.state = {"rng": torch.get_rng_state()}
            if torch.cuda.is_available():
                self.state["cuda_rng"] = torch.cuda.get_rng_state_all()


def train(t3_base, conds: Conditionals, data: SpeakerData, out_dir: Path,
          settings: TrainSettings, base_identity: str, progress=None,
          resume: bool = False, lock=None) -> dict:
    """Fine-tune a copy of ``t3_base`` on ``data`` and write the adapter directory; returns
    its card. ``progress(step, steps, loss)`` after every step. With ``resume``, training
    goes on from ``out_dir/checkpoint.pt``, which must come from the same base weights,
    data and settings. ``lock``: held while training draws random numbers (see
    ``_RandomState``), between steps released, so that generations go on meanwhile."""
    out_dir = _check_out_dir(Path(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    train_set, val_set = split(data, settings.val_fraction, settings.seed)
    randomness = _RandomState(settings.seed, lock or contextlib.nullcontext())
    with randomness.drawing():
        t3 = copy.deepcopy(t3_base).float()
        t3.requires_grad_(False)
        offset = None
        if settings.method == "lora":
            params = add_lora(t3, settings.rank, settings.alpha, settings.target)
        elif settings.method == "speaker-adapter":
            offset = torch.zeros(1, t3.hp.speaker_embed_size, device=t3.device,
                                 requires_grad=True)
            params = [offset]
        else:
            t3.requires_grad_(True)
            params = list(t3.parameters())
    if settings.gradient_checkpointing:
        t3.tfmr.gradient_checkpointing_enable()
    t3.train()
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)

    start, history = 0, []
    checkpoint = out_dir / "checkpoint.pt"
    # What a checkpoint must match to be resumed, besides the settings: resuming on other
    # weights or clips would silently train a mix of both.
    made_on = {"base_weights": base_identity, "data_hash": data.data_hash,
               "shapes": [list(p.shape) for p in params]}
    if resume:
        start, history, randomness.state = _load_checkpoint(checkpoint, settings, made_on,
                                                            params, optimizer)

    def loss_of(example):
        cond = speaker_cond(conds, settings.exaggeration, t3.device, offset)
        return example_loss(t3, cond, example.text_tokens, example.speech_tokens,
                            settings.text_loss_weight)

    started = time.perf_counter()
    for step in range(start, settings.steps):
        with randomness.drawing():
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for item in range(settings.batch):
                example = _example_for(train_set, step * settings.batch + item, settings.seed)
                loss, speech_loss = loss_of(example)
                (loss / settings.batch).backward()
                total += float(speech_loss) / settings.batch
            optimizer.step()
        history.append(round(total, 5))
        if progress:
            progress(step + 1, settings.steps, total)
        if (step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps:
            with _written("the checkpoint", checkpoint):
                _save_checkpoint(checkpoint, settings, made_on, params, optimizer, step + 1,
                                 history, randomness.state)
    train_seconds = time.perf_counter() - started

    t3.eval()
    with torch.no_grad():
        val_loss = (sum(float(loss_of(e)[1]) for e in val_set) / len(val_set)
                    if val_set else None)
    card = {
        "version": CARD_VERSION,
        "base_weights": base_identity,
        "method": settings.method,
        "settings": asdict(settings),
        "steps": settings.steps,
        "train_loss_first": history[0] if history else None,
        "train_loss_final": history[-1] if history else None,
        "val_loss": round(val_loss, 5) if val_loss is not None else None,
        "train_clips": len(train_set),
        "val_clips": len(val_set),
        "data_seconds": round(data.seconds, 1),
        "data_hash": data.data_hash,
        "reference": Path(data.reference).name,
        "train_seconds": round(train_seconds, 1),
        "loss_history": history,
    }

    def write(tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed earlier run
        tmp.mkdir()
        _write_outputs(tmp, t3, conds, settings, offset)
        _link_or_copy(checkpoint, tmp / "checkpoint.pt")
        (tmp / "card.json").write_text(json.dumps(card, indent=1))
    with _written("the adapter", out_dir):
        write_atomically(out_dir, write)
    return card


@contextlib.contextmanager
def _written(what: str, path: Path):
    """A write that fails, a full disk above all, as one FinetuneError saying what to do.
    torch.save reports a full disk as a RuntimeError ("unexpected pos ...") and safetensors
    as a SafetensorError, neither an OSError. What was there before is left whole."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FinetuneError(f"Could not write {what} to {path} ({reason}); is the disk full? "
                            "An earlier adapter there is left as it was: free some space and "
                            "train again (--resume goes on from the last checkpoint written)."
                            ) from None


def _check_out_dir(out_dir: Path) -> Path:
    """The adapter directory as training writes it (a symlink's target), checked before
    any training. It is replaced whole when training ends, so it may hold only what
    training writes (anything else would be lost), and cannot be a mount point (which
    cannot be renamed: all the training was done, then nothing written)."""
    if out_dir.is_symlink():
        out_dir = out_dir.resolve()  # else the link itself was replaced by a folder
    if os.path.ismount(out_dir):
        raise FinetuneError(f"{out_dir} is a mount point, which cannot be replaced whole; "
                            f"give a folder inside it, such as {out_dir / 'adapter'}.")
    if not out_dir.is_dir():
        return out_dir
    others = sorted(p.name for p in out_dir.iterdir() if p.name not in OUTPUTS
                    and not (p.name.startswith(".") and ".tmp" in p.name))  # killed writes
    if others:
        raise FinetuneError(f"{out_dir} holds files that fine-tuning did not write "
                            f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}); "
                            "choose a new or empty folder: the adapter replaces it whole.")
    return out_dir


def _link_or_copy(source: Path, target: Path) -> None:
    # A full fine-tune's checkpoint is gigabytes; a hard link costs nothing, and the old
    # folder keeps its own name for it until the new one is in place.
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _state_of(params) -> dict[str, torch.Tensor]:
    # No copy on a CPU: torch.save writes the live tensors (a copy of all of T3 would cost
    # 2 GB more at full size).
    return {str(i): p.detach().cpu() for i, p in enumerate(params)}


def _save_checkpoint(path: Path, settings, made_on: dict, params, optimizer, step: int,
                     history, random_state: dict) -> None:
    # The random state too: T3's conditioning encoder has dropout, and a resumed run must
    # draw what an uninterrupted one would. On a GPU the dropout draws from CUDA's
    # generators, so theirs is saved as well (random_state has both, see _RandomState).
    state = {**made_on, "settings": json.dumps(asdict(settings)), "step": step,
             "history": history,
             "params": _state_of(params), "optimizer": optimizer.state_dict(),
             **random_state}
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def _load_checkpoint(path: Path, settings, made_on: dict, params,
                     optimizer) -> tuple[int, list, dict]:
    if not path.exists():
        raise FinetuneError(f"Nothing to resume: {path} does not exist.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    _check_checkpoint(path, state, settings, made_on)
    if state["step"] > settings.steps:
        raise FinetuneError(f"The checkpoint is at step {state['step']}, past --steps "
                            f"{settings.steps}.")
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(state["params"][str(i)])
    optimizer.load_state_dict(state["optimizer"])
    random_state = {key: state[key] for key in ("rng", "cuda_rng") if key in state}
    return state["step"], list(state["history"]), random_state


def _check_checkpoint(path: Path, state: dict, settings, made_on: dict) -> None:
    """Refuse a checkpoint made on other weights, clips, method or settings, saying which."""
    if any(key not in state for key in made_on):
        raise FinetuneError(f"{path} was written by an older version, which did not record "
                            "the base weights and clips it was trained on: resuming could "
                            f"mix them. {START_OVER.capitalize()}.")
    if state["base_weights"] != made_on["base_weights"]:
        raise FinetuneError(f"The checkpoint was trained on the weights "
                            f"{state['base_weights']}, not the loaded "
                            f"{made_on['base_weights']}: load those to resume, or "
                            f"{START_OVER}.")
    if state["data_hash"] != made_on["data_hash"]:
        raise FinetuneError("The checkpoint was trained on other clips (the dataset's audio "
                            "or transcripts changed since): resume on the same clips, or "
                            f"{START_OVER}.")
    saved = json.loads(state["settings"])
    now = json.loads(json.dumps(asdict(settings)))  # tuples as JSON lists, as saved
    # Only the length of the run may change on resume.
    changed = [f"{key} {saved.get(key)!r}, now {now.get(key)!r}"
               for key in sorted(saved.keys() | now.keys())
               if key != "steps" and saved.get(key) != now.get(key)]
    if changed:
        raise FinetuneError(f"The checkpoint was made with other settings ({'; '.join(changed)}"
                            f"): resume with the same settings (only --steps may change), or "
                            f"{START_OVER}.")
    if state["shapes"] != made_on["shapes"]:
        raise FinetuneError("The checkpoint's trainable weights do not have this model's "
                            f"shapes: {START_OVER}.")


def _write_outputs(out_dir: Path, t3, conds: Conditionals, settings: TrainSettings,
                   offset: torch.Tensor | None) -> None:
    speaker = conds
    if settings.method == "lora":
        save_file(lora_state(t3), out_dir / FILES["lora"])
    elif settings.method == "speaker-adapter":
        save_file({"speaker_emb_offset": offset.detach().cpu().contiguous()},
                  out_dir / FILES["speaker-adapter"])
        speaker = Conditionals(speaker_cond(conds, settings.exaggeration, "cpu",
                                            offset.detach().cpu()), conds.gen)
    else:
        save_file(checkpoint_state(t3), out_dir / FILES["full"])
    speaker.save(out_dir / "conds.pt")


def load_upstream_state(t3, state: dict[str, torch.Tensor]) -> None:
    """Load a full checkpoint (checked to fit first: :func:`adapted_t3`); the derived
    wrapper's tensors are not in it."""
    t3.load_state_dict(state, strict=False)


# --- using an adapter -----------------------------------------------------------------------


def read_card(adapter_dir: Path, base_identity: str) -> dict:
    """The adapter's card, checked: trained on the ``base_identity`` weights, every file
    the method needs is there, and its weights file is whole (:func:`_check_weights`)."""
    adapter_dir = Path(adapter_dir)
    try:
        card = json.loads((adapter_dir / "card.json").read_text())
        method = card["method"]
    except (OSError, ValueError, KeyError, TypeError):
        raise FinetuneError(f"{adapter_dir} is not an adapter directory: card.json is "
                            "missing or unreadable") from None
    if method not in METHODS:
        raise FinetuneError(f"{adapter_dir}/card.json names an unknown method {method!r}")
    if card.get("base_weights") != base_identity:
        raise FinetuneError(f"This adapter was trained on weights {card.get('base_weights')}, "
                            f"not the loaded {base_identity}; train it again on these.")
    for name in (FILES[method], "conds.pt"):
        if not (adapter_dir / name).exists():
            raise FinetuneError(f"{adapter_dir} has no {name}: copy the whole adapter "
                                "directory that `finetune train` wrote")
    _check_weights(adapter_dir / FILES[method], card)
    return card


def _check_weights(path: Path, card: dict) -> None:
    """Refuse a weights file cut short (a copy or download that stopped) or holding other
    tensors than the card's method writes: when the adapter is imported, not at every
    generation after it. Only the header is read, and safetensors checks that the file is
    as long as the header says, so this costs little even for a full T3; whether the
    tensors fit this T3's layers is checked as they are loaded into it."""
    try:
        with safe_open(path, "pt") as file:
            shapes = {key: list(file.get_slice(key).get_shape()) for key in file.keys()}
    except SafetensorError as exc:
        raise _damaged(path, exc) from None
    problem = _weights_problem(card, shapes)
    if problem:
        raise FinetuneError(f"{path} does not hold a {card['method']} adapter's weights "
                            f"({problem}); {WHOLE_COPY}.")


def _weights_problem(card: dict, shapes: dict[str, list[int]]) -> str | None:
    """What is wrong with the tensors ``shapes`` for the card's method, or None."""
    if not shapes:
        return "it holds no tensors"
    if card["method"] == "full":
        return None  # which tensors a T3 has is known only to the T3 it is loaded into
    if card["method"] == "speaker-adapter":
        offset = shapes.get("speaker_emb_offset")
        if len(shapes) != 1 or offset is None or len(offset) != 2 or offset[0] != 1:
            return "it should hold one 1 x N tensor, speaker_emb_offset"
        return None
    settings = card.get("settings") if isinstance(card.get("settings"), dict) else {}
    rank, alpha = settings.get("rank"), settings.get("alpha")
    # Merging scales by alpha / rank.
    if type(rank) is not int or rank < 1 or type(alpha) not in (int, float):
        return "its card.json lacks the LoRA rank and alpha"
    for key, shape in shapes.items():
        layer, _, part = key.rpartition(".")
        other = {"lora_A": "lora_B", "lora_B": "lora_A"}.get(part)
        if other is None or f"{layer}.{other}" not in shapes:
            return f"{key} is not one of a pair of LoRA matrices"
        # A is rank x inputs, B is outputs x rank.
        if len(shape) != 2 or shape[0 if part == "lora_A" else 1] != rank:
            return f"{key} is {' x '.join(map(str, shape))}, not of rank {rank}"
    return None


def _damaged(path: Path, exc: Exception) -> FinetuneError:
    return FinetuneError(f"{path} is damaged or incomplete ({exc}); {WHOLE_COPY}.")


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except SafetensorError as exc:  # damaged on disk since read_card looked at it
        raise _damaged(path, exc) from None


def check_fits(adapter_dir: Path, t3, base_identity: str) -> None:
    """Refuse, when it is imported, an adapter whose tensors do not fit ``t3``'s layers:
    it was listed and failed only when the voice was first used, blaming other base
    weights. Reads the weights file's header only."""
    card = read_card(adapter_dir, base_identity)
    path = Path(adapter_dir) / FILES[card["method"]]
    with safe_open(path, "pt") as file:
        shapes = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    _check_fit(path, card["method"], shapes, t3)


def _check_fit(path: Path, method: str, shapes: dict[str, tuple], t3) -> None:
    problem = _fit_problem(method, shapes, t3)
    if problem:
        raise FinetuneError(f"{path} does not fit the loaded T3 ({problem}); {WHOLE_COPY}.")


def _fit_problem(method: str, shapes: dict[str, tuple], t3) -> str | None:
    if method == "speaker-adapter":
        size = (1, t3.hp.speaker_embed_size)
        offset = shapes["speaker_emb_offset"]
        return None if offset == size else f"its offset is {_shape(offset)}, not {_shape(size)}"
    if method == "full":
        expected = {key: tuple(value.shape) for key, value in checkpoint_state(t3).items()}
        missing = sorted(expected.keys() - shapes.keys())
        unexpected = sorted(shapes.keys() - expected.keys())
        other = sorted(k for k in expected.keys() & shapes.keys() if expected[k] != shapes[k])
        parts = [f"{label} {names[:3]}" for label, names in (
            ("missing", missing), ("unexpected", unexpected), ("other shapes for", other))
            if names]
        return "; ".join(parts) or None
    modules = dict(t3.tfmr.named_modules())
    for key, shape in shapes.items():
        if not key.endswith(".lora_A"):
            continue
        path = key[: -len(".lora_A")]
        layer = modules.get(path)
        if not isinstance(layer, torch.nn.Linear):
            return f"it names {path}, which this T3 does not have as a Linear layer"
        pair = (shapes[f"{path}.lora_B"][0], shape[1])
        if pair != (layer.out_features, layer.in_features):
            return (f"its {path} is for a {_shape(pair)} layer, this T3's is "
                    f"{_shape((layer.out_features, layer.in_features))}")
    return None


def _shape(shape) -> str:
    return " x ".join(map(str, shape))


def adapted_t3(t3_base, adapter_dir: Path, base_identity: str):
    """A copy of ``t3_base`` with the adapter's weights in it (LoRA merged, or the full
    checkpoint loaded); ``t3_base`` itself is left exactly as it was. None for a
    speaker-adapter, which changes only the conditionals."""
    card = read_card(adapter_dir, base_identity)
    if card["method"] == "speaker-adapter":
        return None
    path = Path(adapter_dir) / FILES[card["method"]]
    state = _load_weights(path)
    # Checked when imported too, but the stored copy may have changed since.
    _check_fit(path, card["method"], {key: tuple(value.shape) for key, value in state.items()},
               t3_base)
    t3 = copy.deepcopy(t3_base)
    if card["method"] == "lora":
        merge_lora(t3, state, card["settings"]["rank"], card["settings"]["alpha"])
    else:
        load_upstream_state(t3, state)
    return t3.eval()


def settings_from(values: dict) -> TrainSettings:
    """TrainSettings from loose values (CLI, page), with targets as 'q,k,v' or a list."""
    known = {f.name for f in fields(TrainSettings)}
    values = {k: v for k, v in values.items() if k in known and v is not None}
    target = values.get("target")
    if isinstance(target, str):
        short = {t.split("_")[0]: t for t in LORA_TARGETS}
        values["target"] = tuple(short.get(t.strip(), t.strip()) for t in target.split(",")
                                 if t.strip())
    elif target is not None:
        values["target"] = tuple(target)
    return TrainSettings(**values)
