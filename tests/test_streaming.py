"""Streaming: audio handed over while the model still works, the same tokens as a one-shot
generation, joins without clicks, long text chunk by chunk, and a stream that is dropped
frees the model."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from conftest import slow_first_variant_build

from chatterbox_demo import longform, pipeline
from chatterbox_demo.config import GenerationParams, get_preset
from chatterbox_demo.longform import Stitcher
from chatterbox_demo.manager import TextError

TEXT = "Streaming speaks while the model is still working on the rest."


def collect(manager, text, params, preset, **kwargs):
    chunks = list(manager.stream(text, "calm-mid", params, get_preset(preset), **kwargs))
    return chunks, chunks[-1].synthesis


@pytest.mark.parametrize("preset", ["cached", "cpu-fast"])
def test_a_stream_samples_the_same_tokens_as_one_generation(tiny_manager, preset):
    params = GenerationParams(seed=4, max_new_tokens=120)
    one = tiny_manager.generate(TEXT, "calm-mid", params, get_preset(preset), ignore_stop=True)
    chunks, streamed = collect(tiny_manager, TEXT, params, preset, ignore_stop=True)
    assert streamed.speech_tokens == one.speech_tokens
    assert len(streamed.wav) == len(one.wav)
    assert np.array_equal(np.concatenate([c.wav for c in chunks]), streamed.wav)
    assert len(chunks) >= 3  # blocks of 16 and 64 tokens, the rest, the held-back tail
    report = streamed.report
    assert report["streamed"] and 0 < report["first_audio_s"] < report["timings"]["total_s"]
    assert report["timings"]["t3_tokens"] == 120 and report["preset"] == preset
    again = collect(tiny_manager, TEXT, params, preset, ignore_stop=True)[1]
    assert np.array_equal(again.wav, streamed.wav)  # same seed, same stream


def test_s3gen_seeding_puts_back_the_accelerators_generator_too(monkeypatch):
    """torch.manual_seed reseeds every device: on MPS, saving only the CPU's state left a
    stream's later tokens drawn from a reseeded generator, unlike run() with that seed.
    (No accelerator here, so the forks are recorded rather than run.)"""
    forked = []
    real_fork = torch.random.fork_rng

    def record(devices=None, enabled=True, device_type="cuda", **kwargs):
        forked.append((list(devices), device_type))
        return real_fork([], enabled)

    monkeypatch.setattr(torch.random, "fork_rng", record)
    monkeypatch.setattr(torch, "manual_seed", lambda seed: None)
    for device in ("cpu", "cuda:1", "mps"):
        with pipeline.seeded_apart(3, device):
            pass
    assert forked == [([], "cuda"), ([1], "cuda"), ([0], "mps")]


def test_the_fast_decoder_hands_over_audio_before_it_has_finished(tiny_manager):
    config = get_preset("cpu-fast")
    t3, s3gen = tiny_manager.variant(config)
    conds, _ = tiny_manager.library.conditionals(tiny_manager.library.get("calm-mid"))
    pieces = list(pipeline.run_stream(
        tiny_manager.loaded.tts, TEXT, conds, 0.5, GenerationParams(seed=1), 200, 1200,
        config, t3=t3, s3gen=s3gen, ignore_stop=True))
    assert pieces[0].t3_tokens < 50 and pieces[-1].t3_tokens == 200
    assert not pieces[0].continues and all(p.continues for p in pieces[1:])
    assert [p.final for p in pieces] == [False] * (len(pieces) - 1) + [True]


def test_rerendered_blocks_stitch_back_to_the_signal():
    # Pieces cut as run_stream cuts them (each from `overlap` samples before the previous
    # one ended): with the same audio in both, the equal-gain fade gives it back exactly.
    rng = np.random.default_rng(0)
    signal = rng.standard_normal(20_000).astype(np.float32)
    overlap, ends = 1200, [3000, 9000, 15000, 20_000]
    stitcher, out, start = Stitcher(overlap), [], 0
    for end in ends:
        out.append(stitcher.add(signal[max(0, start - overlap):end], same_signal=start > 0))
        start = end
    out.append(stitcher.finish())
    assert np.allclose(np.concatenate(out), signal, atol=1e-5)


def test_block_joins_have_no_clicks(tiny_manager):
    params = GenerationParams(seed=2, max_new_tokens=150)
    chunks, streamed = collect(tiny_manager, TEXT, params, "cpu-fast", ignore_stop=True)
    overlap = int(longform.CROSSFADE_S * streamed.sample_rate)
    joins = np.cumsum([len(c.wav) for c in chunks[:-1]])
    jumps = np.abs(np.diff(streamed.wav))
    near = np.zeros(len(jumps), bool)
    for join in joins:
        near[max(0, join - 2): join + overlap + 2] = True
    assert jumps[near].max() <= jumps[~near].max()


def test_long_text_streams_chunk_by_chunk(tiny_manager):
    text = " ".join(f"This is sentence number {i}, which says a little more." for i in range(15))
    said = []
    params = GenerationParams(seed=6, max_new_tokens=20)
    chunks, streamed = collect(tiny_manager, text, params, "cached",
                               progress=lambda fraction, message: said.append(message))
    count = len(longform.chunk_text(text))
    assert count >= 3 and said == [f"chunk {i} of {count}" for i in range(1, count + 1)]
    assert [c.chunk for c in chunks] == sorted(c.chunk for c in chunks)
    assert chunks[0].chunk == 1 and chunks[-1].chunk == count
    assert [c["text"] for c in streamed.report["chunks"]] == longform.chunk_text(text)
    again = collect(tiny_manager, text, params, "cached")[1]
    assert np.array_equal(again.wav, streamed.wav)


def test_a_streamed_chunk_reports_its_own_samples_as_one_generation_does(tiny_manager):
    """Each piece after a chunk's first re-renders the end of the one before, and those
    samples were counted twice in the chunk's report."""
    text = " ".join(f"This is sentence number {i}, which says a little more." for i in range(8))
    params = GenerationParams(seed=11, max_new_tokens=60)
    streamed = collect(tiny_manager, text, params, "cached")[1]
    whole = tiny_manager.generate_long(text, "calm-mid", params, get_preset("cached"))
    assert len(streamed.report["pieces"]) > len(streamed.report["chunks"])  # blocks, joined
    assert ([c["samples"] for c in streamed.report["chunks"]]
            == [c["samples"] for c in whole.report["chunks"]])


START = 6561  # the start-of-speech token, which random weights may sample


def force_start_token(t3, steps):
    """A hook making the start token certain at these decode calls (0 = prefill)."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        if steps is None or calls["n"] in steps:
            output[..., START] = 1e4
        calls["n"] += 1
        return output

    return t3.speech_head.register_forward_hook(hook)


def run_and_stream(manager, monkeypatch, decoder: str, start_at):
    """The sampled tokens, then what :func:`pipeline.run` and :func:`pipeline.run_stream`
    render of them (or the GenerationError each raises), with start tokens forced."""
    tts = manager.load().tts
    conds, _ = manager.library.conditionals(manager.library.get("calm-mid"))
    monkeypatch.setattr(pipeline, "step_mode", lambda t3, config: "plain")  # hooks reach it
    config = dataclasses.replace(get_preset("baseline"), t3_decoder=decoder)
    params = GenerationParams(seed=2)
    sampling = pipeline._sampling(tts, tts.t3, TEXT, conds, 0.5, params, 40)

    def hooked(work):
        handle = force_start_token(tts.t3, start_at)
        try:
            return work()
        except pipeline.GenerationError as error:
            return error
        finally:
            handle.remove()

    def sampled():
        pipeline.seed_everything(params.seed)
        with torch.inference_mode():
            return torch.cat(list(pipeline._token_blocks(tts.t3, sampling, config, False)),
                             dim=1)[0].tolist()

    def one_shot():
        return pipeline.run(tts, TEXT, conds, 0.5, params, 40, config).speech_tokens

    def streamed():
        pieces = pipeline.run_stream(tts, TEXT, conds, 0.5, params, 40, 480, config)
        return [token for piece in pieces for token in piece.speech_tokens]

    return hooked(sampled), hooked(one_shot), hooked(streamed)


@pytest.mark.parametrize("decoder", ["stock", "fast"])
@pytest.mark.parametrize("start_at", [{20}, {5, 20}])
def test_one_shot_and_stream_render_the_same_tokens_around_start_tokens(
        tiny_manager, monkeypatch, decoder, start_at):
    # Upstream's filter kept only what followed a start token, and only when given the
    # whole sequence at once (two of them crashed it): the stream rendered other tokens.
    sampled, one_shot, streamed = run_and_stream(tiny_manager, monkeypatch, decoder,
                                                 start_at)
    assert all(sampled[step] == START for step in start_at)
    assert one_shot == streamed == [token for token in sampled if token < START]


@pytest.mark.parametrize("decoder", ["stock", "fast"])
def test_nothing_but_start_tokens_is_a_generation_error(tiny_manager, monkeypatch, decoder):
    sampled, one_shot, streamed = run_and_stream(tiny_manager, monkeypatch, decoder, None)
    assert set(sampled) == {START}
    for result in (one_shot, streamed):
        assert isinstance(result, pipeline.GenerationError), result
        assert "stopped before producing any speech" in str(result)


def test_a_dropped_stream_frees_the_model(tiny_manager):
    stream = tiny_manager.stream(TEXT, "calm-mid", GenerationParams(max_new_tokens=200),
                                 get_preset("cpu-fast"), ignore_stop=True)
    next(stream)
    stream.close()  # as a web server does when the listener goes away
    done = []
    worker = threading.Thread(target=lambda: done.append(
        tiny_manager.generate("Next.", "calm-mid", GenerationParams(max_new_tokens=10))))
    worker.start()
    worker.join(timeout=60)
    assert done, "the model stayed locked after the stream was dropped"


def test_bad_text_fails_before_any_audio(tiny_manager):
    with pytest.raises(TextError, match="Enter some text"):
        next(tiny_manager.stream("   ", "calm-mid"))
    with pytest.raises(ValueError, match="Unknown voice"):
        next(tiny_manager.stream("Hello.", "nobody"))


def synthesize_in_page(stream: bool):
    from chatterbox_demo import ui

    return list(ui.synthesize("Hello from the page.", "calm-mid", "cached", 0.5, 0.5, 0.8,
                              1.0, 0.05, 1.2, 0, 60, stream,
                              progress=lambda *args, **kwargs: None))


def test_the_page_streams_with_progress_then_the_whole_result(tiny_manager, monkeypatch):
    from chatterbox_demo import ui

    monkeypatch.setattr(ui, "manager", lambda: tiny_manager)
    monkeypatch.setattr(ui, "STREAMING", True)
    updates = synthesize_in_page(stream=True)
    assert len(updates) >= 3
    *during, (whole, table, report, _) = updates
    assert all(status.startswith("Streaming chunk 1 of 1:") for _, status, _, _ in during)
    live = np.concatenate([update[3][1] for update in updates if isinstance(update[3], tuple)])
    assert whole[1].dtype == np.int16 and np.array_equal(live, whole[1])
    assert "first audio" in table and report["streamed"]


def test_the_page_reports_a_preset_switch_apart_from_the_run(tiny_manager, monkeypatch):
    """A switch says so while it runs (a compiled preset compiles then, for a minute or
    more) and its time is reported beside the run's timings, not in them."""
    from chatterbox_demo import ui

    monkeypatch.setattr(ui, "manager", lambda: tiny_manager)
    monkeypatch.setattr(ui, "STREAMING", False)
    tiny_manager.apply_preset("baseline")
    said = []
    slow_first_variant_build(tiny_manager, monkeypatch, seconds=2.0)

    def synthesize():
        [(_, table, report, _)] = list(ui.synthesize(
            "Hello from the page.", "calm-mid", "cached", 0.5, 0.5, 0.8, 1.0, 0.05, 1.2, 0, 20,
            False, progress=lambda *args, desc=None, **kwargs: said.append(desc)))
        return table, report

    table, report = synthesize()
    assert "Switching to cached" in said
    timings = report["timings"]
    assert timings["build_s"] >= 2.0
    assert f"preparing the preset took {timings['build_s']:.1f} s" in table
    assert timings["total_s"] < 2.0  # the switch is not part of the run
    said.clear()
    table, report = synthesize()  # the same preset again: no switch
    assert not any(message and message.startswith("Switching") for message in said)
    assert report["timings"]["build_s"] < 0.1 and "preparing the preset" not in table


def test_no_event_of_the_page_tracks_tqdm_bars():
    """Gradio's tqdm tracking keeps every bar opened during an event and re-sends them all
    on each update; Inductor's code generation opens one per kernel and never closes it.
    Switching the app to cpu-compiled under tracking grew it from 8 GB past 16 GB."""
    import inspect

    import gradio as gr

    from chatterbox_demo import ui

    tracked = {}
    for name, fn in vars(ui).items():
        if inspect.isfunction(fn):
            for parameter in inspect.signature(fn).parameters.values():
                if isinstance(parameter.default, gr.Progress):
                    tracked[name] = parameter.default.track_tqdm
    assert {"synthesize", "run_compare", "add_voice"} <= tracked.keys()
    assert not any(tracked.values()), tracked


def test_the_timed_events_show_small_progress_on_their_audio_only():
    """Gradio's default progress animates a loader over every output; a browser on the
    app's own 2-core machine spent half a core drawing them, slowing the very run whose
    time the page reports (docs/benchmarks.md, "A browser on the same machine")."""
    from chatterbox_demo import ui

    config = ui.build_demo().get_config_file()
    labels = {c["id"]: c["props"].get("label") for c in config["components"]}
    shown = {d["api_name"]: (d["show_progress"], [labels[i] for i in d["show_progress_on"]])
             for d in config["dependencies"] if d["api_name"] in ("synthesize", "compare")}
    assert shown == {"synthesize": ("minimal", ["Result"]), "compare": ("minimal", ["A", "B"])}


def test_stream_starts_ticked_on_cuda_only(monkeypatch):
    """On a CPU every streamed piece repeats S3Gen's pass over the reference prompt:
    "Hello there." whole took 11.3 s, streamed 21.7 s (docs/benchmarks.md, "Streaming")."""
    from chatterbox_demo import ui

    monkeypatch.setattr(ui, "STREAMING", True)
    assert ui.stream_box("cuda")["value"] is True
    cpu = ui.stream_box("cpu")
    assert cpu["value"] is False and "paragraph" in cpu["info"]
    assert ui.stream_box("mps")["value"] is False
    monkeypatch.setattr(ui, "STREAMING", False)  # the box stays as built: greyed, with why
    assert "value" not in ui.stream_box("cuda")


def test_stream_is_built_unticked_until_the_page_load_knows_the_device(monkeypatch):
    """The page-load event ticks it on CUDA once the model has loaded; a click before
    then, during the first load, must not stream on a CPU."""
    from chatterbox_demo import ui

    monkeypatch.setattr(ui, "STREAMING", True)
    config = ui.build_demo().get_config_file()
    [box] = [c["props"] for c in config["components"] if c["props"].get("label") == "Stream"]
    assert box["value"] is False and box["interactive"] is True


def test_the_page_says_why_it_cannot_stream_without_ffmpeg(tiny_manager, monkeypatch):
    import gradio as gr

    from chatterbox_demo import ui

    monkeypatch.setattr(ui, "manager", lambda: tiny_manager)
    monkeypatch.setattr(ui, "STREAMING", False)
    with pytest.raises(gr.Error, match="ffmpeg"):
        synthesize_in_page(stream=True)
    # Without ffmpeg the live player is a plain one, left alone: one message.
    [(whole, _, report, live)] = synthesize_in_page(stream=False)
    assert live == gr.skip() and "streamed" not in report


def test_unstreamed_with_ffmpeg_the_live_stream_gets_the_whole_result_first(tiny_manager,
                                                                             monkeypatch):
    """A streaming player must be started once per run, and one started empty made the
    page poll its playlist hundreds of times a second; the page drops a result sent with
    a stream's start (tests/test_browser.py holds both in a real page)."""
    import gradio as gr

    from chatterbox_demo import ui

    monkeypatch.setattr(ui, "manager", lambda: tiny_manager)
    monkeypatch.setattr(ui, "STREAMING", True)
    (*skipped, piece), (whole, _, report, live) = synthesize_in_page(stream=False)
    assert skipped == [gr.skip()] * 3 and live == gr.skip()
    assert piece[0] == whole[0] and np.array_equal(piece[1], whole[1])
    assert "streamed" not in report
