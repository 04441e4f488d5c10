"""The command line: ``python -m chatterbox_demo synth|voices|bench|finetune ...``.

Errors a user can cause end the program with exit status 2 and one line on stderr;
Ctrl-C ends it with 130 and the line "interrupted".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from . import bench, speaker_data
from .audio import EXTENSIONS, load_reference, write_wav
from .config import (
    DEVICE_PRESETS,
    MAX_LONG_TEXT_CHARS,
    PRESETS,
    RANGES,
    SWEEP,
    GenerationParams,
    check_number,
    config_from_spec,
)
from .finetune import METHODS, TrainSettings, settings_from
from .manager import DEVICES, ModelManager, check_text
from .pipeline import GenerationError
from .voices import VoiceError, check_name, name_key
from .weights import SOURCES

# OSError: a file the user named that cannot be read or written; output paths are checked
# before the work (check_output), so this is the last resort.
USER_ERRORS = (ValueError, OSError, GenerationError)

# S3Gen needs two speech tokens, and random weights (tiny, random) sample a token that is
# not speech about one time in five: at --tokens 2 or 3 every row of a run failed with
# "stopped before producing any speech"; from 4 every preset ran.
MIN_BENCH_TOKENS = 4


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--weights", default=os.environ.get("CHATTERBOX_WEIGHTS", "auto"),
        help=f"model source: {', '.join(SOURCES)} (default: $CHATTERBOX_WEIGHTS or auto)",
    )
    common.add_argument(
        "--device", default=os.environ.get("CHATTERBOX_DEVICE", "auto"),
        help=f"{', '.join(DEVICES)} (default: $CHATTERBOX_DEVICE or auto)",
    )
    source = common  # weights and device only; bench takes its own --json
    common = argparse.ArgumentParser(add_help=False, parents=[source])
    common.add_argument("--json", action="store_true", help="print one JSON object")

    parser = argparse.ArgumentParser(prog="python -m chatterbox_demo",
                                     description="Chatterbox TTS: synthesize and manage voices")
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", parents=[common], help="speak a text to a WAV file")
    text_source = synth.add_mutually_exclusive_group(required=True)
    text_source.add_argument("--text")
    text_source.add_argument("--text-file", type=Path,
                        help=f"UTF-8 text of up to {MAX_LONG_TEXT_CHARS} characters, spoken in "
                             "sentence chunks")
    synth.add_argument("--voice", default=None,
                       help="a voice name from the library, or the path of a reference clip")
    synth.add_argument("--out", required=True, type=Path, help="output WAV path")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--max-tokens", type=int, default=None,
                       help=f"speech-token budget, 25 per second of audio "
                            f"(max {RANGES['max_new_tokens'][1]}; default from the text length)")
    synth.add_argument("--exaggeration", type=float, default=None)
    synth.add_argument("--cfg-weight", type=float, default=0.5)
    synth.add_argument("--temperature", type=float, default=0.8)
    # None: the manager's preset for the device it runs on (DEVICE_PRESETS).
    device_presets = ", ".join(f"{preset} on {device}" for device, preset in
                               DEVICE_PRESETS.items())
    synth.add_argument("--preset", default=None,
                       help=f"optimization preset (default: the device's, {device_presets}), "
                            "optionally with fields changed as in bench --presets")

    bench = commands.add_parser("bench", parents=[source],
                                help="measure presets side by side in one process")
    bench.add_argument("--json", nargs="?", const="-", default=None, metavar="F",
                       help="write the result as JSON to F (alone: print it)")
    bench.add_argument("--presets", default="baseline,cached,cpu-fast",
                       help=f"comma-separated, from: {', '.join(PRESETS)}; a preset with "
                            f"fields changed: cached+compile_mode=max-autotune+cfm_steps=8")
    bench.add_argument("--tokens", type=int, default=100,
                       help=f"speech tokens per run, at least {MIN_BENCH_TOKENS}, stop token "
                            "ignored (25 per second)")
    bench.add_argument("--repeats", type=int, default=1)
    bench.add_argument("--text", default=None)
    bench.add_argument("--voice", default=None)
    bench.add_argument("--voices", default=None,
                       help="comma-separated voices: each preset runs once per voice")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--no-fidelity", action="store_true",
                       help="skip the agreement-with-fp32 measurements")
    bench.add_argument("--sweep", action="store_true",
                       help="measure the speed-fidelity sweep (CFM steps, CFG in the CFM, "
                            "reference prompt length) instead of --presets")
    bench.add_argument("--stream", action="store_true",
                       help="also stream each preset's generation once: first-audio and "
                            "streamed-total columns")
    bench.add_argument("--markdown", type=Path, default=None, help="write a markdown table")
    bench.add_argument("--plot", type=Path, default=None,
                       help="write a chart: seconds per stage (with --sweep: speed against "
                            "fidelity), as PNG, SVG, PDF... by the file's suffix")

    voices = commands.add_parser("voices", help="list, add, rename or remove voices")
    actions = voices.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", parents=[common], help="add a voice from an audio file")
    add.add_argument("name")
    add.add_argument("path", type=Path)
    add.add_argument("--exaggeration", type=float, default=0.5)
    actions.add_parser("list", parents=[common], help="list the voices")
    remove = actions.add_parser("remove", parents=[common], help="remove a voice")
    remove.add_argument("name")
    rename = actions.add_parser("rename", parents=[common], help="rename a voice")
    rename.add_argument("name")
    rename.add_argument("new_name")
    _finetune_parser(commands, common)
    return parser


def _finetune_parser(commands, common) -> None:
    defaults = TrainSettings()
    tune = commands.add_parser("finetune", help="fine-tune T3 on a speaker's clips")
    steps = tune.add_subparsers(dest="action", required=True)
    prepare = steps.add_parser("prepare", parents=[common],
                               help="check a dataset folder and cache its tokens")
    prepare.add_argument("data_dir", type=Path)
    train = steps.add_parser("train", parents=[common], help="train an adapter")
    train.add_argument("data_dir", type=Path)
    train.add_argument("--out", required=True, type=Path, help="adapter directory to write")
    train.add_argument("--method", default=defaults.method, choices=METHODS)
    train.add_argument("--rank", type=int, default=defaults.rank)
    train.add_argument("--alpha", type=float, default=defaults.alpha)
    train.add_argument("--target", default=",".join(defaults.target),
                       help="LoRA targets: q,k,v,o and optionally gate,up,down (the MLP)")
    train.add_argument("--steps", type=int, default=defaults.steps)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument("--batch", type=int, default=defaults.batch)
    train.add_argument("--seed", type=int, default=defaults.seed)
    train.add_argument("--val-fraction", type=float, default=defaults.val_fraction)
    train.add_argument("--text-loss", type=float, default=defaults.text_loss_weight,
                       help="weight of the text cross-entropy (default 0: speech only)")
    train.add_argument("--gradient-checkpointing", action="store_true")
    train.add_argument("--resume", action="store_true",
                       help="go on from OUT/checkpoint.pt (same settings; --steps may grow)")
    train.add_argument("--name", default=None, help="also add the result as a voice")
    imported = steps.add_parser("import", parents=[common],
                                help="add an adapter directory as a voice")
    imported.add_argument("adapter_dir", type=Path)
    imported.add_argument("--name", required=True)
    imported.add_argument("--exaggeration", type=float, default=0.5)
    demo = steps.add_parser("demo-data", help="write a small espeak-ng dataset to try it with")
    demo.add_argument("out", type=Path, help="a new or empty folder")
    demo.add_argument("--clips", type=int, default=12)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        # Upstream code prints progress to stdout; keep stdout for our own output.
        with contextlib.redirect_stdout(sys.stderr):
            result = run(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C is the user's choice, not a fault to trace. Files are written whole or
        # not at all (files.write_atomically), so what was saved before stays as it was.
        print("interrupted", file=sys.stderr)
        return 130  # what a shell reports for a command ended by SIGINT
    print(result)
    return 0


def run(args: argparse.Namespace) -> str:
    if args.command == "finetune" and args.action == "demo-data":
        check_number("--clips", args.clips, 2, 200, integer=True)
        folder = speaker_data.make_espeak_dataset(args.out, args.clips)
        return f"wrote {args.clips} clips with transcripts to {folder}"
    manager = ModelManager.configure(
        weights_spec=args.weights,
        device=args.device,
        cache_dir=os.environ.get("CHATTERBOX_DEMO_CACHE") or None,
        prepare_preset=False,  # synth applies its preset, bench each row's
    )
    if args.command == "synth":
        return synth(manager, args)
    if args.command == "bench":
        return run_bench(manager, args)
    if args.command == "finetune":
        return run_finetune(manager, args)
    # What can be checked from what was typed and the library's files is, before the model
    # loads: a typo then costs no loading and prints one line.
    if args.action == "add":
        check_name(args.name)
        check_number("exaggeration", args.exaggeration, *RANGES["exaggeration"])
        load_reference(args.path)
        voice = manager.add_voice(args.name, args.path, args.exaggeration)
        return _dump(voice_row(voice)) if args.json else f"added voice {voice.name!r}"
    if args.action in ("remove", "rename"):
        manager.check_voice(args.name)
    if args.action == "rename":
        check_name(args.new_name)
    if args.action == "remove":
        voice = manager.remove_voice(args.name)
        return _dump(voice_row(voice)) if args.json else f"removed voice {voice.name!r}"
    if args.action == "rename":
        voice = manager.rename_voice(args.name, args.new_name)
        return _dump(voice_row(voice)) if args.json else f"renamed to {voice.name!r}"
    rows = [voice_row(v) for v in manager.list_voices()]
    if args.json:
        return _dump(rows)
    return "\n".join(f"{r['name']:<24} {r['kind']:<9} exaggeration {r['exaggeration']:.2f}"
                     for r in rows)


def read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"Text file {str(path)!r} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"Cannot read text file {str(path)!r} as UTF-8 text ({exc}).") \
            from None


def check_output(flag: str, path: Path, formats: list[str] | None = None,
                 new_folders: bool = False) -> None:
    """Refuse an output path that cannot be written before the work whose result it would
    lose: a directory, a suffix not in ``formats``, or a folder that is missing (unless
    ``new_folders``: the writer makes them), not a folder, or not writable."""
    shown = repr(str(path))
    if path.is_dir():  # first: "end it in .wav" would not say that a folder was given
        raise ValueError(f"{flag} {shown} is a folder; give a file path.")
    if formats is not None and path.suffix[1:].lower() not in formats:
        raise ValueError(f"{flag} {shown}: end it in one of "
                         f"{', '.join('.' + name for name in formats)}.")
    folder = path.parent
    while new_folders and not folder.exists():
        folder = folder.parent
    if not folder.exists():
        raise ValueError(f"{flag} {shown}: the folder {str(folder)!r} does not exist.")
    if not folder.is_dir():
        raise ValueError(f"{flag} {shown}: {str(folder)!r} is a file, not a folder.")
    try:  # a real file, not os.access: root passes that even where nothing can be written
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {shown}: cannot write in {str(folder)!r} ({exc.strerror})."
                         ) from None
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {shown}: the file is read-only.")


def same_file(one: Path, other: Path) -> bool:
    """Whether two paths name one file: through ``..``, a link to a folder, or (both
    existing) a hard link."""
    if one.resolve() == other.resolve():
        return True
    return one.exists() and other.exists() and one.samefile(other)


def synth(manager: ModelManager, args: argparse.Namespace) -> str:
    # What the user typed is checked before the model loads and before the preset is
    # built (minutes for a compiled one): a typo must not cost either.
    # write_wav writes WAV whatever the name says, and makes missing folders.
    check_output("--out", args.out, ["wav"], new_folders=True)
    text = read_text_file(args.text_file) if args.text_file else args.text
    check_text(text, MAX_LONG_TEXT_CHARS)
    config = config_from_spec(args.preset) if args.preset else None
    params = GenerationParams(
        seed=args.seed, max_new_tokens=args.max_tokens, exaggeration=args.exaggeration,
        cfg_weight=args.cfg_weight, temperature=args.temperature,
    )
    if args.voice and not Path(args.voice).is_file():
        check_voice_name(manager, args.voice)  # from the library's files: nothing loads
    # Applied first: a preset this device cannot run is refused before the model loads
    # (the voice library below loads it). Without --preset, the device's: loading built
    # nothing (prepare_preset=False), so apply_s is this preset's build in either case.
    manager.apply(config or manager.config, args.preset or manager.preset)
    apply_s = manager.last_apply_s  # building the variant (and compiling a compiled one)
    voice_file = None
    voice = args.voice
    library_names = {name_key(name) for name in manager.library.names()}
    if voice and name_key(voice) not in library_names:
        if Path(voice).is_file():
            voice_file, voice = Path(voice), None
        else:
            check_voice_name(manager, voice)
    result = manager.generate_long(text, voice, params, voice_file=voice_file,
                                   progress=lambda fraction, message:
                                   print(f"[synth] {message}", file=sys.stderr, flush=True))
    write_wav(args.out, result.wav, result.sample_rate)
    report = {**result.report, "out": str(args.out)}
    report["timings"]["build_s"] = round(report["timings"]["build_s"] + apply_s, 4)
    if args.json:
        return _dump(report)
    t = report["timings"]
    prepared = (f"; the preset was prepared in {t['build_s']:.2f} s before that"
                if t["build_s"] >= 0.1 else "")
    return (f"wrote {args.out} ({report['audio_seconds']:.2f} s of audio) in {t['total_s']:.2f} s:"
            f" conditioning {t['conditioning_s']:.2f} s ({report['voice']['source']}),"
            f" T3 {t['t3_s']:.2f} s ({t['t3_tokens']} tokens), S3Gen {t['s3gen_s']:.2f} s,"
            f" watermark {t['watermark_s']:.2f} s{prepared}")


def check_voice_name(manager: ModelManager, voice: str) -> None:
    """Refuse a --voice that names no voice, before the model loads where the library's
    files can tell (a typo then costs no loading), and no file either."""
    try:
        manager.check_voice(voice)
    except VoiceError:
        if Path(voice).suffix.lower() in EXTENSIONS or os.sep in voice:
            # Meant as a clip: "Unknown voice 'my-clip.wav'" sent people to the voice list.
            raise ValueError(f"Audio file {voice!r} does not exist; --voice takes a voice's "
                             "name (see `voices list`) or the path of a reference clip."
                             ) from None
        raise


def run_bench(manager: ModelManager, args: argparse.Namespace) -> str:
    # Everything is checked before minutes of measuring: each preset name (a changed one
    # built), the text every row speaks, and the paths the results go to.
    presets = list(SWEEP) if args.sweep else [name.strip() for name in args.presets.split(",")
                                              if name.strip()]
    if not presets:
        raise ValueError(f"--presets names no preset; give some of: {', '.join(PRESETS)}.")
    configs = {**SWEEP, **{name: config_from_spec(name) for name in presets
                           if name not in SWEEP}}
    check_number("--tokens", args.tokens, MIN_BENCH_TOKENS, RANGES["max_new_tokens"][1],
                 integer=True)
    check_number("--repeats", args.repeats, 1, 100, integer=True)
    text = bench.DEFAULT_TEXT if args.text is None else args.text
    check_text(text)  # each row is one generation: the one-generation limit
    voices = [v.strip() for v in args.voices.split(",") if v.strip()] if args.voices else None
    for voice in voices or ([args.voice] if args.voice else []):
        manager.check_voice(voice)  # from the library's files: nothing loads
    json_path = Path(args.json) if args.json not in (None, "-") else None
    if json_path:
        check_output("--json", json_path)
    if args.markdown:
        check_output("--markdown", args.markdown)
    if args.plot:
        check_output("--plot", args.plot, bench.plot_formats())
        if args.sweep and args.no_fidelity:  # no figure to place a point by: an empty chart
            raise ValueError("--plot with --sweep draws speed against fidelity: leave out "
                             "--no-fidelity, or --plot.")
    # Two results sent to one file: the later write replaced the earlier, unsaid.
    outputs = [(flag, path) for flag, path in (("--json", json_path),
                                               ("--markdown", args.markdown),
                                               ("--plot", args.plot)) if path]
    for index, (flag, path) in enumerate(outputs):
        for earlier_flag, earlier in outputs[:index]:
            if same_file(earlier, path):
                raise ValueError(f"{earlier_flag} and {flag} name the same file "
                                 f"{str(path)!r}: give each its own path.")
    result = bench.run(manager, presets, text=text,
                       voice=args.voice, tokens=args.tokens, repeats=args.repeats,
                       seed=args.seed, with_fidelity=not args.no_fidelity, configs=configs,
                       stream=args.stream,
                       voices=voices,
                       log=lambda line: print(line, file=sys.stderr, flush=True))
    errors = [row["error"] for row in result["rows"] if "error" in row]
    if len(errors) == len(result["rows"]):
        # A failed row is part of a result, but with every row failed there is none: exit 0
        # told a script it had worked, and a table of errors replaced an earlier run's.
        reason = errors[0] if len(set(errors)) == 1 else "the [bench] lines above say why"
        raise ValueError(f"Nothing was measured: every row failed ({reason}); no file was "
                         "written.")
    if json_path:  # first: the whole result, should a later write fail after all
        bench.write_json(result, json_path)
    if args.markdown:
        bench.write_markdown(result, args.markdown)
    if args.plot:
        (bench.plot_tradeoff if args.sweep else bench.plot)(result, args.plot)
    if args.json == "-":
        return bench.to_json(result, indent=None)
    return bench.to_markdown(result)


def run_finetune(manager: ModelManager, args: argparse.Namespace) -> str:
    if args.action == "prepare":
        data = manager.prepare_dataset(args.data_dir)
        if args.json:
            return _dump({"clips": len(data.examples), "seconds": round(data.seconds, 1),
                          "problems": data.problems, "reference": data.reference,
                          "data_hash": data.data_hash})
        return data.report()
    if args.action == "import":
        voice = manager.add_finetuned_voice(args.name, args.adapter_dir, args.exaggeration)
        return _dump(voice_row(voice)) if args.json else f"added fine-tuned voice {voice.name!r}"
    settings = settings_from({
        "method": args.method, "rank": args.rank, "alpha": args.alpha,
        "target": args.target, "steps": args.steps, "lr": args.lr, "batch": args.batch,
        "seed": args.seed, "val_fraction": args.val_fraction,
        "text_loss_weight": args.text_loss,
        "gradient_checkpointing": args.gradient_checkpointing})
    if args.out.exists() and not args.out.is_dir():  # else a raw error once the model loaded
        raise ValueError(f"--out {str(args.out)!r} is a file; give a folder for the adapter "
                         "(a new one, or one that holds an earlier adapter).")
    if args.name:  # a bad or taken name must not cost a training run first
        check_name(args.name)  # before the model loads
        manager.library.check_new_name(args.name)
    from tqdm import tqdm

    with tqdm(total=settings.steps, desc="fine-tuning", file=sys.stderr) as bar:
        def progress(step, steps, loss):
            bar.n = step
            bar.set_postfix(loss=f"{loss:.3f}")

        card = manager.finetune(args.data_dir, args.out, settings, progress, args.resume)
    if args.name:
        try:
            manager.add_finetuned_voice(args.name, args.out)
        except VoiceError as exc:  # the name was taken while it trained, say
            raise VoiceError(f"{exc} The adapter is written: add it with `python -m "
                             f"chatterbox_demo finetune import {args.out} --name NAME`."
                             ) from None
    if args.json:
        return _dump({k: v for k, v in card.items() if k != "loss_history"})
    return (f"wrote {args.out}: {card['method']}, {card['steps']} steps, train loss "
            f"{card['train_loss_first']} -> {card['train_loss_final']}, validation loss "
            f"{card['val_loss']}" + (f"; added voice {args.name!r}" if args.name else ""))


def voice_row(voice) -> dict:
    row = {"name": voice.name, "kind": voice.kind, "exaggeration": voice.exaggeration,
           "seconds": voice.seconds}
    if voice.kind == "finetuned":
        row["method"] = voice.method
    return row


def _dump(data) -> str:
    return json.dumps(data, indent=None)
