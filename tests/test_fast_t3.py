"""The fast T3 decoder computes what the stock one does, and samples the same way."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopPLogitsWarper,
)

from chatterbox_demo.fast_t3 import FastT3Decoder, StaticKVCache, bucket_for, sample_token
from chatterbox_demo.pipeline import t3_cond_for

VOCAB = 8194
START, STOP = 6561, 6562


@pytest.fixture(scope="module")
def model(tiny_manager):
    tts = tiny_manager.load().tts
    voice = tiny_manager.library.get("calm-mid")
    conds, _ = tiny_manager.library.conditionals(voice)
    return tts, conds


def text_batch(tts, text="Hello world, a test.") -> torch.Tensor:
    tokens = tts.tokenizer.text_to_tokens(text)
    tokens = torch.cat([tokens, tokens])
    return F.pad(F.pad(tokens, (1, 0), value=255), (0, 1), value=0)


def prefix_embeds(t3, conds, text_tokens) -> torch.Tensor:
    cond = t3_cond_for(conds, 0.5, "cpu")
    start = START * torch.ones_like(text_tokens[:, :1])
    embeds, _ = t3.prepare_input_embeds(t3_cond=cond, text_tokens=text_tokens,
                                        speech_tokens=start, cfg_weight=0.5)
    bos = t3.speech_emb(start[:1]) + t3.speech_pos_emb.get_fixed_embedding(0)
    return torch.cat([embeds, bos.expand(2, -1, -1)], dim=1)


def test_teacher_forced_logits_match_the_hf_model(model):
    """Prefill and 12 decode steps through our static cache against HF's dynamic cache
    with upstream's flags (eager attention outputs): the same logits."""
    tts, conds = model
    t3 = tts.t3
    with torch.inference_mode():
        embeds = prefix_embeds(t3, conds, text_batch(tts))
        reference = t3.tfmr(inputs_embeds=embeds, use_cache=True, output_attentions=True,
                            output_hidden_states=True)
        past = reference.past_key_values
        decoder = FastT3Decoder(t3)
        cache = StaticKVCache(len(t3.tfmr.layers), 2, 16, embeds.shape[1] + 16, 64,
                              torch.float32, "cpu")
        ours = decoder.forward(embeds, cache, 0)
        expected = t3.speech_head(reference.hidden_states[-1])[:, -1]
        assert torch.allclose(ours, expected, atol=1e-4)
        for step in range(12):
            token = torch.tensor([[100 + 37 * step]])
            embed = t3.speech_emb(token) + t3.speech_pos_emb.get_fixed_embedding(step + 1)
            embed = embed.expand(2, -1, -1)
            out = t3.tfmr(inputs_embeds=embed, past_key_values=past, use_cache=True,
                          output_attentions=True, output_hidden_states=True)
            past = out.past_key_values
            expected = t3.speech_head(out.hidden_states[-1])[:, -1]
            ours = decoder.forward(embed, cache, embeds.shape[1] + step)
            assert torch.allclose(ours, expected, atol=1e-4), f"step {step}"


def assert_compiles_as_one_graph(step, run) -> None:
    """``run(step_fn)`` (a list of outputs) gives the same for ``step`` and for ``step``
    compiled with ``fullgraph``, which raises on any graph break; the eager backend keeps
    it quick."""
    compiled = torch.compile(step, dynamic=True, fullgraph=True, backend="eager")
    with torch.inference_mode():
        expected, outputs = run(step), run(compiled)
    for got, want in zip(outputs, expected, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_the_layer_step_compiles_as_one_graph_for_prefill_and_decode(model):
    """torch.compile's target in the fast decoder: no graph break (one once hid in SDPA's
    is_causal flag), and the compiled step computes what the eager one does."""
    from chatterbox_demo import fast_t3

    tts, conds = model
    t3 = tts.t3

    def run(step_fn):
        embeds = prefix_embeds(t3, conds, text_batch(tts))
        length = embeds.shape[1]
        cache = StaticKVCache(1, 2, 16, length + 4, 64, torch.float32, "cpu")
        outputs = []
        # The prefill, a decode step, another, and a prefill after a kept voice prefix
        # (with its own causal mask).
        for start, x in ((0, embeds), (length, embeds[:, -1:]), (length + 1, embeds[:, :1]),
                         (10, embeds[:, 10:])):
            positions = torch.arange(start, start + x.shape[1]).unsqueeze(0)
            cos, sin = t3.tfmr.rotary_emb(x, positions)
            mask = (torch.ones(x.shape[1], start + x.shape[1], dtype=torch.bool).tril(start)
                    if start and x.shape[1] > 1 else None)
            outputs.append(step_fn(t3.tfmr.layers[0], x, cos, sin, cache.k[0], cache.v[0],
                                   start, x.shape[1] > 1, mask))
        return outputs

    assert_compiles_as_one_graph(fast_t3._layer_forward, run)


def test_the_single_token_step_compiles_as_one_graph_under_a_bucket_mask(model):
    """The step CUDA graphs capture, compiled (a compiled configuration with CUDA graphs):
    no graph break, and the same output as eager at positions in two buckets."""
    from chatterbox_demo import fast_t3

    tts, conds = model
    t3 = tts.t3

    def run(step_fn):
        x = prefix_embeds(t3, conds, text_batch(tts))[:, -1:]
        cache = StaticKVCache(1, 2, 16, 256, 64, torch.float32, "cpu")
        cache.k.normal_(generator=torch.Generator().manual_seed(0))
        cache.v.normal_(generator=torch.Generator().manual_seed(1))
        outputs = []
        for position in (40, 70):
            pos = torch.tensor([position])
            bucket = bucket_for(position, cache.max_len)
            mask = (torch.arange(bucket) <= pos).view(1, 1, 1, bucket)
            cos, sin = t3.tfmr.rotary_emb(x, pos.view(1, 1))
            outputs.append(step_fn(t3.tfmr.layers[0], x, cos, sin, cache.k[0], cache.v[0],
                                   pos, mask))
        return outputs

    assert_compiles_as_one_graph(fast_t3._layer_forward_at, run)


def test_a_compiled_t3_compiles_the_single_token_step_too():
    """With ``compile_mode`` set on the T3, the graph-capturable step is the compiled one,
    not only the prefill's (before, a compiled configuration with CUDA graphs captured the
    eager step)."""
    from chatterbox_demo import fast_t3

    assert fast_t3.layer_step("off", at_position=True) is fast_t3._layer_forward_at
    compiled = fast_t3.layer_step("default", at_position=True)
    assert compiled is not fast_t3._layer_forward_at
    assert compiled is fast_t3.layer_step("default", at_position=True)  # once per mode
    assert compiled is not fast_t3.layer_step("default")


@pytest.mark.parametrize("temperature, repetition_penalty, min_p, top_p, cfg", [
    (0.8, 1.2, 0.05, 1.0, 0.5),  # upstream defaults
    (1.0, 1.0, 0.0, 1.0, 0.0),
    (0.5, 1.5, 0.1, 0.9, 1.0),
    (1.3, 1.1, 0.0, 0.5, 0.3),
])
def test_sampling_matches_upstream_processors(temperature, repetition_penalty, min_p, top_p,
                                              cfg):
    """Same logits, same seed: upstream's HF processor chain and ours draw the same token."""
    generator = torch.Generator().manual_seed(7)
    history = torch.tensor([[START, 5, 77, 77, 900]])
    seen = torch.zeros(1, VOCAB, dtype=torch.bool)
    seen[0, history[0]] = True
    for trial in range(50):
        logits = torch.randn(2, VOCAB, generator=generator) * 3
        cond = logits[0:1] + cfg * (logits[0:1] - logits[1:2])
        scores = RepetitionPenaltyLogitsProcessor(repetition_penalty)(history, cond.clone())
        if temperature != 1.0:
            scores = scores / temperature
        scores = MinPLogitsWarper(min_p)(history, scores) if min_p > 0 else scores
        scores = TopPLogitsWarper(top_p)(history, scores)
        torch.manual_seed(trial)
        expected = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
        torch.manual_seed(trial)
        ours = sample_token(logits, seen, torch.tensor(cfg), temperature, repetition_penalty,
                            min_p, top_p)
        assert ours.item() == expected.item(), f"trial {trial}"


def force_stop_at(t3, step_index: int):
    """A hook making the stop token certain at decode call ``step_index`` (0 = prefill)."""
    calls = {"n": 0}

    def hook(module, inputs, output):
        if calls["n"] == step_index:
            output[..., STOP] = 1e4
        calls["n"] += 1
        return output

    return t3.speech_head.register_forward_hook(hook)


@pytest.mark.parametrize("stop_at", [0, 5, 16, 17, 40])
def test_stops_at_the_first_stop_token_whatever_the_check_interval(model, stop_at):
    tts, conds = model
    handle = force_stop_at(tts.t3, stop_at)
    try:
        tokens = FastT3Decoder(tts.t3, stop_check_every=16).generate(
            t3_cond=t3_cond_for(conds, 0.5, "cpu"), text_tokens=text_batch(tts),
            max_new_tokens=60)
    finally:
        handle.remove()
    assert tokens.shape == (1, stop_at + 1)
    assert tokens[0, -1].item() == STOP
    assert (tokens[0, :-1] != STOP).all()


def test_budget_is_respected_and_results_are_seeded(model):
    tts, conds = model
    decoder = FastT3Decoder(tts.t3)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(decoder.generate(t3_cond=t3_cond_for(conds, 0.5, "cpu"),
                                     text_tokens=text_batch(tts), max_new_tokens=25))
    assert runs[0].shape[1] <= 25
    assert torch.equal(runs[0], runs[1])


def test_cfg_weight_zero_equals_unguided_logits():
    logits = torch.randn(2, VOCAB)
    seen = torch.zeros(1, VOCAB, dtype=torch.bool)
    torch.manual_seed(0)
    guided = sample_token(logits, seen, torch.tensor(0.0), 1.0, 1.0, 0.0, 1.0)
    torch.manual_seed(0)
    plain = sample_token(logits[:1], seen, torch.tensor(0.0), 1.0, 1.0, 0.0, 1.0)
    assert guided.item() == plain.item()


def test_bucket_covers_the_position_and_never_passes_the_cache():
    assert [bucket_for(p, 1000) for p in (0, 63, 64, 127, 128)] == [64, 64, 128, 128, 192]
    assert bucket_for(990, 1000) == 1000


def test_graph_ready_step_matches_the_plain_step_over_stale_cache(model):
    """The CUDA-graph step (device-tensor position, masked bucket) gives the plain step's
    logits, across bucket boundaries, even when the cache holds garbage past the position
    (as a reused graph cache does)."""
    tts, conds = model
    t3 = tts.t3
    with torch.inference_mode():
        embeds = prefix_embeds(t3, conds, text_batch(tts))
        prefix = embeds.shape[1]
        plain = StaticKVCache(len(t3.tfmr.layers), 2, 16, prefix + 100, 64, torch.float32,
                              "cpu")
        bucketed = StaticKVCache(len(t3.tfmr.layers), 2, 16, prefix + 100, 64, torch.float32,
                                 "cpu")
        bucketed.k.normal_(), bucketed.v.normal_()
        decoder = FastT3Decoder(t3)
        decoder.forward(embeds, plain, 0)
        decoder.forward(embeds, bucketed, 0)
        for step in range(100):
            token = torch.tensor([[100 + 37 * step]])
            embed = t3.speech_emb(token) + t3.speech_pos_emb.get_fixed_embedding(step + 1)
            embed = embed.expand(2, -1, -1)
            position = prefix + step
            expected = decoder.forward(embed, plain, position)
            ours = decoder.forward_at(embed, bucketed.k, bucketed.v, torch.tensor([position]),
                                      bucket_for(position, bucketed.max_len))
            assert torch.allclose(ours, expected, atol=1e-4), f"step {step}"


def test_graph_ready_decoder_draws_the_same_tokens(model):
    tts, conds = model
    runs = {}
    for mode in ("plain", "bucketed"):
        torch.manual_seed(11)
        runs[mode] = FastT3Decoder(tts.t3, step_mode=mode).generate(
            t3_cond=t3_cond_for(conds, 0.5, "cpu"), text_tokens=text_batch(tts),
            max_new_tokens=90, stop_on_eos=False)
    assert runs["plain"].shape == (1, 90)
    assert torch.equal(runs["plain"], runs["bucketed"])


@pytest.mark.parametrize("preset", ["fast-decoder", "t3-int8", "t3-onednn"])
def test_traced_step_draws_the_same_tokens_at_every_length(model, preset):
    """One trace, recorded at position 1 of a 2-position cache, serves generations of
    other lengths and texts and draws exactly the tokens the eager step does: the used
    cache length is computed from the position on each call, not frozen in the trace."""
    from chatterbox_demo.config import PRESETS
    from chatterbox_demo.fast_t3 import _TRACED_STEPS
    from chatterbox_demo.optimizations import build_t3

    tts, conds = model
    t3 = build_t3(tts.t3, PRESETS[preset])
    cond = t3_cond_for(conds, 0.5, "cpu", t3.speech_emb.weight.dtype)
    for text, tokens in (("Hello world, a test.", 90), ("A longer sentence, to move the "
                                                        "prompt along the cache.", 30)):
        runs = {}
        for mode in ("plain", "traced"):
            torch.manual_seed(5)
            runs[mode] = FastT3Decoder(t3, step_mode=mode).generate(
                t3_cond=cond, text_tokens=text_batch(tts, text), max_new_tokens=tokens,
                stop_on_eos=False)
        assert runs["plain"].shape == (1, tokens)
        assert torch.equal(runs["plain"], runs["traced"])
    assert len(_TRACED_STEPS[t3]) == 1  # recorded once for both generations


def cond_with_speaker(conds, speaker: torch.Tensor, exaggeration: float = 0.5):
    """The T3 conditioning of ``conds`` with another speaker embedding: another voice."""
    cond = t3_cond_for(conds, exaggeration, "cpu")
    cond.speaker_emb = speaker
    return cond


@pytest.mark.parametrize("step_mode", ["plain", "traced", "bucketed"])
def test_a_kept_voice_prefix_draws_the_same_tokens(model, step_mode):
    """With ``reuse_voice_prefix`` the prefill runs over the text after the voice's kept
    keys and values: in fp32 the same tokens as a whole prefill, at any exaggeration
    (its position comes after the voice's), for another text, and for another voice."""
    import copy

    from chatterbox_demo.fast_t3 import _VOICE_PREFIXES

    tts, conds = model
    t3 = copy.deepcopy(tts.t3)  # a T3 of its own, so that it starts with no kept prefix
    speaker, other = conds.t3.speaker_emb, conds.t3.speaker_emb.flip(-1)
    cases = [(speaker, 0.5, "Hello world, a test."), (speaker, 1.5, "Hello world, a test."),
             (speaker, 0.5, "Another text, longer than the first one was."),
             (other, 0.5, "Hello world, a test.")]
    for voice, exaggeration, text in cases:
        runs = {}
        for reuse in (False, True):
            torch.manual_seed(3)
            runs[reuse] = FastT3Decoder(t3, step_mode=step_mode,
                                        reuse_voice_prefix=reuse).generate(
                t3_cond=cond_with_speaker(conds, voice, exaggeration),
                text_tokens=text_batch(tts, text), max_new_tokens=40, stop_on_eos=False)
        assert runs[True].shape == (1, 40)
        assert torch.equal(runs[False], runs[True]), (exaggeration, text)
    kept = _VOICE_PREFIXES[t3]
    assert len(kept) == 2  # one per voice, whatever the text and exaggeration
    # Speaker embedding and the perceiver's 32 prompt positions; the emotion one follows.
    assert kept[0][0].shape == (1, 33, t3.cfg.hidden_size)


def test_kept_voice_prefixes_are_bounded(model, monkeypatch):
    """The most recently used voices' prefixes are kept, the others dropped."""
    import copy

    from chatterbox_demo import fast_t3

    monkeypatch.setattr(fast_t3, "VOICE_PREFIXES_KEPT", 2)
    tts, conds = model
    t3 = copy.deepcopy(tts.t3)
    voices = [conds.t3.speaker_emb * scale for scale in (1.0, 0.5, 0.25)]
    decoder = FastT3Decoder(t3, reuse_voice_prefix=True)
    # The second 1 finds its prefix behind 0's (once an error: list.remove compared the
    # kept tensors with ==).
    for voice in (voices[0], voices[1], voices[1], voices[0], voices[2]):
        decoder.generate(t3_cond=cond_with_speaker(conds, voice), text_tokens=text_batch(tts),
                         max_new_tokens=2, stop_on_eos=False)
    kept = fast_t3._VOICE_PREFIXES[t3]
    speakers = [entry[0][0, 0] for entry in kept]
    expected = [t3.cond_enc.spkr_enc(v)[0] for v in voices]
    with torch.inference_mode():
        assert len(kept) == 2
        assert torch.allclose(speakers[0], expected[0]) and torch.allclose(speakers[1],
                                                                           expected[2])


def test_decode_steps_kept_per_t3_do_not_keep_the_t3_alive(model):
    """Traced steps, CUDA-graph steps and voice prefixes are kept per T3 module for later
    calls; an evicted variant must still be freed, so they may not hold the module."""
    import copy
    import gc
    import weakref

    tts, conds = model
    t3 = copy.deepcopy(tts.t3)
    for mode in ("traced", "cuda-graph"):  # a CUDA-graph step captures only when called
        FastT3Decoder(t3, step_mode=mode)._cache_and_step(2, 64)
    FastT3Decoder(t3, reuse_voice_prefix=True).generate(  # keeps a voice prefix
        t3_cond=t3_cond_for(conds, 0.5, "cpu"), text_tokens=text_batch(tts),
        max_new_tokens=2, stop_on_eos=False)
    alive = weakref.ref(t3)
    del t3
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("preset", ["cached", "fast-decoder", "cpu-fast"])
def test_ignoring_the_stop_token_holds_for_every_decoder(model, preset):
    """A T3 whose head all but always draws the stop token decodes the whole budget when
    told to ignore it: the stock decoder through a hook on the speech head, the fast one
    (its step traced on a CPU, where no hook can reach) by masking the logit itself."""
    import copy

    from chatterbox_demo import pipeline
    from chatterbox_demo.config import PRESETS, GenerationParams
    from chatterbox_demo.optimizations import build_t3

    tts, conds = model
    t3 = copy.deepcopy(tts.t3)
    head = t3.speech_head
    t3.speech_head = torch.nn.Linear(head.in_features, head.out_features)
    with torch.no_grad():
        t3.speech_head.weight.copy_(head.weight)
        t3.speech_head.bias.zero_()
        t3.speech_head.bias[STOP] = 1e3
    config = PRESETS[preset]
    t3 = build_t3(t3, config)
    sampling = pipeline._sampling(tts, t3, "Hello world, a test.", conds, 0.5,
                                  GenerationParams(max_new_tokens=20), 20)
    for ignore_stop, expected in ((False, 1), (True, 20)):
        with torch.inference_mode():
            blocks = list(pipeline._token_blocks(t3, sampling, config, ignore_stop))
        tokens = torch.cat(blocks, dim=1)
        assert tokens.shape[-1] == expected, (ignore_stop, tokens)
        assert (tokens == STOP).any().item() is not ignore_stop


def on_device(kind: str) -> torch.nn.Module:
    """A stand-in T3 for step_mode, which reads only the module's device."""
    module = torch.nn.Linear(1, 1)
    module.device = torch.device(kind)
    return module


def test_cpu_decoding_replays_a_trace_unless_compiling_or_torchao():
    from dataclasses import replace

    from chatterbox_demo.config import PRESETS
    from chatterbox_demo.pipeline import step_mode

    cpu = on_device("cpu")
    assert step_mode(cpu, PRESETS["cpu-fast"]) == "traced"
    assert step_mode(cpu, replace(PRESETS["t3-int8"], compile_mode="default")) == "plain"
    assert step_mode(cpu, PRESETS["t3-int8-wo"]) == "plain"  # torchao: not traced
    assert step_mode(cpu, PRESETS["gpu-fast"]) == "cuda-graph"


@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs", "reduce-overhead",
                                  "max-autotune"])
def test_cuda_captures_the_step_itself_in_the_compile_modes_that_capture_graphs(mode):
    """T3's layers are compiled without Inductor's CUDA graphs (test_optimizations), so
    in the modes that promise graphs the fast decoder captures its compiled step itself."""
    from chatterbox_demo.config import OptimizationConfig
    from chatterbox_demo.optimizations import INDUCTOR_GRAPH_MODES
    from chatterbox_demo.pipeline import step_mode

    config = OptimizationConfig(compile_mode=mode, t3_decoder="fast")
    expected = "cuda-graph" if mode in INDUCTOR_GRAPH_MODES else "plain"
    assert step_mode(on_device("cuda"), config) == expected
    assert step_mode(on_device("cuda"), dataclasses.replace(config, cuda_graphs=True)) \
        == "cuda-graph"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_decoder_draws_the_same_tokens_as_eager(model):
    """Run on the GPU machine: the captured step against the eager one, twice, so the
    second call reuses the captured graphs and their cache."""
    import copy

    tts, conds = model
    t3 = copy.deepcopy(tts.t3).cuda()
    cond = t3_cond_for(conds, 0.5, "cuda")
    runs = []
    for mode in ("plain", "cuda-graph", "cuda-graph"):
        torch.manual_seed(11)
        runs.append(FastT3Decoder(t3, step_mode=mode).generate(
            t3_cond=cond, text_tokens=text_batch(tts).cuda(), max_new_tokens=90,
            stop_on_eos=False))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("streamed", [False, True])
def test_the_same_tokens_give_the_same_audio_from_either_decoder(model, monkeypatch, streamed):
    """The fast decoder looks for the stop token every 16 steps and drops what it drew
    after it, so T3 leaves the random state elsewhere than the stock decoder does; S3Gen's
    noise must not depend on that."""
    from chatterbox_demo import pipeline
    from chatterbox_demo.config import BASELINE, GenerationParams

    tts, conds = model
    # Plain steps: a hook on the speech head does not reach a traced one.
    monkeypatch.setattr(pipeline, "step_mode", lambda t3, config: "plain")
    params = GenerationParams(seed=5)
    results = []
    for decoder in ("stock", "fast"):
        config = dataclasses.replace(BASELINE, t3_decoder=decoder)
        handle = force_stop_at(tts.t3, 6)  # the 7th token drawn is the stop token
        try:
            if streamed:
                pieces = list(pipeline.run_stream(tts, "Hello world, a test.", conds, 0.5,
                                                  params, 60, 480, config))
                tokens = [t for piece in pieces for t in piece.speech_tokens]
                wav = np.concatenate([piece.wav for piece in pieces])
                drawn = pieces[-1].t3_tokens
            else:
                result = pipeline.run(tts, "Hello world, a test.", conds, 0.5, params, 60,
                                      config)
                tokens, wav, drawn = result.speech_tokens, result.wav, result.t3_tokens
        finally:
            handle.remove()
        results.append((drawn, tokens, wav))
    (stock_drawn, stock_tokens, stock_wav), (fast_drawn, fast_tokens, fast_wav) = results
    assert stock_drawn == fast_drawn == 7
    assert stock_tokens == fast_tokens
    assert np.array_equal(stock_wav, fast_wav)
