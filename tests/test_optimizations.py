"""Optimizations: what each transform changes, where it can run, how close it stays."""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
from pathlib import Path

import pytest
import torch
from conftest import assert_agrees_with_fp32, dead_pid, presets_keeping_semantics
from torch import nn

from chatterbox_demo import fidelity, optimizations
from chatterbox_demo.compiling import compile_hot
from chatterbox_demo.config import BASELINE, PRESETS, GenerationParams, OptimizationConfig
from chatterbox_demo.optimizations import (
    OneDNNLinear,
    build_s3gen,
    build_t3,
    cfm_guidance,
    module_bytes,
    unavailable_reason,
)


@pytest.fixture(scope="module")
def tts(tiny_manager):
    return tiny_manager.load().tts


@pytest.fixture(scope="module")
def conds(tiny_manager):
    return tiny_manager.library.conditionals(tiny_manager.library.get("calm-mid"))[0]


def linear_bytes(module: nn.Module) -> int:
    return sum(module_bytes(m) for m in module.modules()
               if isinstance(m, nn.Linear) or type(m).__name__ == "Linear")


# --- configuration -----------------------------------------------------------------------------


def test_default_config_is_the_stock_path():
    assert OptimizationConfig() == BASELINE == PRESETS["baseline"]
    assert not BASELINE.cached_conditionals and BASELINE.t3_decoder == "stock"
    assert BASELINE.cfm_steps == 10 and BASELINE.cfm_cfg


@pytest.mark.parametrize("field, value", [
    ("t3_dtype", "fp8"), ("t3_quant", "int4"), ("t3_decoder", "turbo"),
    ("compile_mode", "fast"), ("cfm_steps", 0), ("cpu_threads", 0),
])
def test_bad_config_values_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        OptimizationConfig(**{field: value})


def test_quantization_needs_fp32_weights():
    with pytest.raises(ValueError, match="fp32"):
        OptimizationConfig(t3_dtype="bf16", t3_quant="int8-dynamic")
    with pytest.raises(ValueError, match="fp32"):
        OptimizationConfig(s3gen_dtype="bf16", s3gen_quant="int8-static")


@pytest.mark.parametrize("fields", [{"t3_dtype": "bf16"}, {"t3_quant": "int8-weight-only"},
                                    {"compile_mode": "default"}])
def test_onednn_packs_fp32_weights_and_leaves_compiling_to_torch_compile(fields):
    with pytest.raises(ValueError, match="t3_onednn"):
        OptimizationConfig(t3_onednn=True, **fields)


def test_static_int8_needs_the_cfm_batch_it_was_exported_for():
    with pytest.raises(ValueError, match="cfm_cfg"):
        OptimizationConfig(s3gen_quant="int8-static", cfm_cfg=False)


def test_static_int8_takes_the_cfm_batch_whole():
    with pytest.raises(ValueError, match="cfm_parallel_rows"):
        OptimizationConfig(s3gen_quant="int8-static", cfm_parallel_rows=True)
    assert PRESETS["cpu-fast"].cfm_parallel_rows
    assert not PRESETS["cpu-compiled"].cfm_parallel_rows


def test_static_int8_compiles_like_torch_compile_so_it_is_warmed_up_on_apply():
    assert OptimizationConfig(s3gen_quant="int8-static").compiles
    assert OptimizationConfig(compile_mode="default").compiles
    assert not PRESETS["cpu-fast"].compiles
    compiled = PRESETS["cpu-compiled"]
    assert (compiled.s3gen_quant, compiled.t3_quant, compiled.t3_decoder) == (
        "int8-static", "int8-dynamic", "fast")
    assert not compiled.changes_output


def test_presets_with_one_optimization_differ_from_cached_in_one_place():
    cached = dataclasses.asdict(PRESETS["cached"])
    for name in ("fast-decoder", "s3gen-bf16", "s3gen-int8", "s3gen-int8-static",
                 "s3gen-parallel-rows"):
        changed = {k for k, v in dataclasses.asdict(PRESETS[name]).items() if cached[k] != v}
        assert len(changed) == 1, (name, changed)


def test_cpu_fast_keeps_upstream_semantics_and_turbo_does_not():
    assert not PRESETS["cpu-fast"].changes_output
    assert PRESETS["cpu-turbo"].changes_output


@pytest.mark.parametrize("config, device, words", [
    (OptimizationConfig(t3_quant="int8-dynamic"), "cuda", "CPU kernels only"),
    (OptimizationConfig(s3gen_quant="int8-dynamic"), "mps", "CPU kernels only"),
    (OptimizationConfig(s3gen_quant="int8-static"), "cuda", "targets CPUs"),
    (OptimizationConfig(t3_onednn=True), "cuda", "oneDNN's CPU kernels"),
    (OptimizationConfig(cfm_parallel_rows=True), "cuda", "CPU cores"),
    (OptimizationConfig(t3_dtype="fp16"), "cpu", "fp16"),
    (OptimizationConfig(tf32=True), "cpu", "CUDA settings"),
    (OptimizationConfig(compile_mode="reduce-overhead"), "cpu", "CUDA graphs"),
])
def test_options_that_cannot_run_say_why(config, device, words):
    assert words in unavailable_reason(config, device)


def test_a_pytorch_without_onednn_is_a_reason(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert "no oneDNN" in unavailable_reason(PRESETS["t3-onednn"], "cpu")


def test_torchao_absence_is_a_reason(monkeypatch):
    monkeypatch.setattr(optimizations, "torchao_problem", lambda: "torchao is not usable")
    reason = unavailable_reason(OptimizationConfig(t3_quant="int8-weight-only"), "cuda")
    assert "torchao" in reason


def test_every_preset_but_the_gpu_ones_runs_on_cpu():
    runnable = {name for name, c in PRESETS.items() if unavailable_reason(c, "cpu") is None}
    assert runnable == set(PRESETS) - {"gpu-fast", "gpu-compiled"}
    assert unavailable_reason(PRESETS["gpu-fast"], "cuda") is None
    assert unavailable_reason(PRESETS["gpu-compiled"], "cuda") is None


def test_a_hot_part_compiles_for_more_variants_than_dynamos_default_eight(monkeypatch):
    """Dynamo keeps eight versions of a function by default and then runs it eagerly for
    new inputs, with only a log warning; the fast decoder's one layer step serves every T3
    variant of the process. Ten input types here stand for ten variants. (Dynamo's eager
    backend keeps versions as Inductor does, without building kernels: under a second
    here, against 40 s with Inductor.)"""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))

    def double(x):  # a function of its own, so its versions start at none
        return x * 2

    compiled = compile_hot(double, "default")
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64,
              torch.int32, torch.int16, torch.int8, torch.uint8, torch.complex64]
    before = counters["stats"]["unique_graphs"]
    for dtype in dtypes:
        assert torch.equal(compiled(torch.ones(3, dtype=dtype)), torch.full((3,), 2, dtype=dtype))
    assert counters["stats"]["unique_graphs"] - before == len(dtypes)


@pytest.mark.parametrize("mode, layers_mode", [
    ("default", "default"), ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
    ("reduce-overhead", "default"), ("max-autotune", "max-autotune-no-cudagraphs")])
def test_t3_layers_are_compiled_without_inductors_cuda_graphs(tts, mode, layers_mode):
    """Inductor's CUDA graphs replay a layer into the same memory 30 times a token, which
    broke T3's forward on an H100; the fast decoder captures its own graphs instead
    (tests/test_fast_t3.py holds that)."""
    config = OptimizationConfig(compile_mode=mode, t3_decoder="fast")
    assert build_t3(tts.t3, config).compile_mode == layers_mode


# --- transforms --------------------------------------------------------------------------------


def test_baseline_shares_the_pristine_modules(tts):
    assert build_t3(tts.t3, BASELINE) is tts.t3
    assert build_s3gen(tts.s3gen, BASELINE) is tts.s3gen


def test_bf16_copy_leaves_the_pristine_weights_alone(tts):
    before = {k: v.clone() for k, v in tts.t3.tfmr.state_dict().items()}
    t3 = build_t3(tts.t3, OptimizationConfig(t3_dtype="bf16"))
    assert t3 is not tts.t3 and t3.speech_emb.weight.dtype == torch.bfloat16
    after = tts.t3.tfmr.state_dict()
    assert all(after[k].dtype == torch.float32 and torch.equal(after[k], v)
               for k, v in before.items())


def test_int8_dynamic_replaces_linear_layers_and_halves_their_memory(tts):
    t3 = build_t3(tts.t3, OptimizationConfig(t3_quant="int8-dynamic"))
    quantized = [m for m in t3.tfmr.modules() if "quantized" in type(m).__module__]
    plain = [m for m in t3.tfmr.modules() if type(m) is nn.Linear]
    assert quantized and not plain
    # The target: int8 T3 weights at least 50% smaller than fp32.
    assert linear_bytes(t3.tfmr) <= 0.5 * linear_bytes(tts.t3.tfmr)


@pytest.mark.parametrize("preset", ["t3-int8", "t3-bf16"])
def test_the_fast_decoder_joins_projections_with_the_same_arithmetic(tts, conds, preset):
    """A fast-decoder variant joins q/k/v and gate/up into one layer each (4 matmul calls
    per layer, not 7); that computes what the separate layers do, in the fast decoder and
    in the HF forward (slices of the joined output), at the same memory. int8 with
    per-channel scales to float rounding; bf16 to bf16's (a joined matmul may sum in
    another order)."""
    from chatterbox_demo.fast_t3 import FastT3Decoder, StaticKVCache
    from chatterbox_demo.pipeline import padded_text_tokens

    joined = build_t3(tts.t3, PRESETS[preset])
    separate = build_t3(tts.t3, dataclasses.replace(PRESETS[preset], t3_decoder="stock"))
    attn, mlp = joined.tfmr.layers[0].self_attn, joined.tfmr.layers[0].mlp
    assert hasattr(attn, "qkv_proj") and hasattr(mlp, "gate_up_proj")
    assert not hasattr(separate.tfmr.layers[0].self_attn, "qkv_proj")
    matmuls = [m for m in joined.tfmr.modules()
               if isinstance(m, (nn.Linear, torch.ao.nn.quantized.dynamic.Linear))]
    assert len(matmuls) == 4 * len(joined.tfmr.layers)
    assert linear_bytes(joined.tfmr) == linear_bytes(separate.tfmr)

    def close(a, b):
        if preset == "t3-int8":  # float logits, each within 1e-5
            return torch.allclose(a, b, atol=1e-5)
        return ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2

    text = padded_text_tokens(tts, tts.t3, "Joined or not.")
    tokens = torch.randint(0, 6561, (30,), generator=torch.Generator().manual_seed(0))
    hf_joined, hf_separate = (fidelity.teacher_forced_logits(t3, conds, text, tokens)
                              for t3 in (joined, separate))
    assert close(hf_joined, hf_separate)
    embeds = torch.randn(2, 12, tts.t3.cfg.hidden_size, generator=torch.Generator()
                         .manual_seed(1))
    fast = []
    for t3 in (joined, separate):
        decoder = FastT3Decoder(t3)
        cache = StaticKVCache(len(t3.tfmr.layers), 2, t3.cfg.num_attention_heads, 16,
                              t3.tfmr.layers[0].self_attn.head_dim, decoder.dtype, "cpu")
        with torch.inference_mode():
            fast.append(decoder.forward(embeds.to(decoder.dtype), cache, 0))
    assert close(fast[0], fast[1])


def test_onednn_packs_every_float_layer_a_decode_step_calls_with_fp32s_arithmetic(tts, conds):
    """``t3_onednn`` swaps T3's fp32 Linear layers (joined, in the fast decoder) for
    oneDNN ones with packed weights: nothing plain is left in the transformer or the
    speech head, the HF forward's slices share the joined module, and the logits are
    fp32's but for summation order. Under int8 only the float speech head is swapped."""
    from chatterbox_demo.pipeline import padded_text_tokens

    t3 = build_t3(tts.t3, PRESETS["t3-onednn"])
    assert not [m for m in t3.tfmr.layers.modules() if type(m) is nn.Linear]
    attn = t3.tfmr.layers[0].self_attn
    assert isinstance(attn.qkv_proj, OneDNNLinear) and attn.q_proj.fused is attn.qkv_proj
    assert isinstance(t3.speech_head, OneDNNLinear) and t3.device.type == "cpu"
    assert type(tts.t3.speech_head) is nn.Linear  # the pristine copy is left alone
    text = padded_text_tokens(tts, tts.t3, "Packed or not.")
    tokens = torch.randint(0, 6561, (30,), generator=torch.Generator().manual_seed(0))
    packed, plain = (fidelity.teacher_forced_logits(m, conds, text, tokens)
                     for m in (t3, tts.t3))
    assert torch.allclose(packed, plain, rtol=1e-4, atol=1e-4)

    int8 = build_t3(tts.t3, dataclasses.replace(PRESETS["t3-int8"], t3_onednn=True))
    assert isinstance(int8.speech_head, OneDNNLinear)
    assert isinstance(int8.tfmr.layers[0].self_attn.qkv_proj,
                      torch.ao.nn.quantized.dynamic.Linear)


def test_fp32_alone_shares_the_pristine_t3_with_separate_projections(tts):
    """The fp32 fast decoder needs no copy of T3 (2 GB at full size) just to join
    projections; torchao's weight-only layers are quantized separately."""
    assert build_t3(tts.t3, PRESETS["fast-decoder"]) is tts.t3
    assert not hasattr(tts.t3.tfmr.layers[0].self_attn, "qkv_proj")
    weight_only = build_t3(tts.t3, PRESETS["t3-int8-wo"])
    assert not hasattr(weight_only.tfmr.layers[0].self_attn, "qkv_proj")


def test_int8_weight_only_quantizes_weights_in_place_and_quarters_them(tts):
    t3 = build_t3(tts.t3, OptimizationConfig(t3_quant="int8-weight-only"))
    weights = [m.weight for m in t3.tfmr.modules() if isinstance(m, nn.Linear)]
    assert weights and all(type(w).__name__ == "AffineQuantizedTensor" for w in weights)
    assert next(tts.t3.tfmr.parameters()).dtype == torch.float32  # the pristine copy
    # int8 values plus a float scale per output channel: about a quarter of fp32.
    assert module_bytes(t3.tfmr) <= 0.3 * module_bytes(tts.t3.tfmr)


def test_int8_weight_only_leaves_process_wide_settings_as_they_were(tts, monkeypatch):
    """torchao's quantize_ tunes the whole process for its own kernels unless told not to:
    fp32 matmuls at "high" precision (TF32 on CUDA, for the stock baseline too) and
    Inductor options. Building one variant must not change how the others run."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "coordinate_descent_tuning", False)
    precision, inductor = torch.get_float32_matmul_precision(), inductor_config.save_config()
    build_t3(tts.t3, OptimizationConfig(t3_quant="int8-weight-only"))
    assert torch.get_float32_matmul_precision() == precision
    assert not inductor_config.coordinate_descent_tuning
    assert inductor_config.save_config() == inductor


def test_s3gen_int8_quantizes_every_linear_layer_of_the_estimator(tts):
    """diffusers' LoRACompatibleLinear subclasses nn.Linear; quantize_dynamic matches exact
    types, so those layers used to stay fp32."""
    s3gen = build_s3gen(tts.s3gen, OptimizationConfig(s3gen_quant="int8-dynamic"))
    layers = [m for m in s3gen.flow.decoder.estimator.modules()
              if isinstance(m, nn.Linear) or type(m).__name__ == "Linear"]
    assert layers and all("quantized" in type(m).__module__ for m in layers)
    # A scale per output channel: closer to fp32 than one per tensor, at the same speed.
    assert all(m.weight().qscheme() == torch.per_channel_affine for m in layers)
    pristine = tts.s3gen.flow.decoder.estimator
    assert any(type(m).__name__ == "LoRACompatibleLinear" for m in pristine.modules())


def test_recording_estimator_calls_gives_ordinary_tensors_and_restores_it(tts, conds):
    """int8-static's calibration data: every CFM step's estimator inputs, as tensors that
    export accepts (upstream runs in inference mode), and the estimator as it was."""
    estimator = tts.s3gen.flow.decoder.estimator
    tokens = conds.gen["prompt_token"][0, :20]
    calls = optimizations.record_estimator_calls(
        tts.s3gen, lambda: fidelity.mel(tts.s3gen, conds, tokens, 3, cfg=True))
    assert len(calls) == 3  # one per CFM step
    frames = calls[0]["x"].shape[2]
    for call in calls:
        assert call["x"].shape == (2, 80, frames)  # CFG's two halves
        assert not any(v.is_inference() for v in call.values() if torch.is_tensor(v))
    assert "forward" not in estimator.__dict__


def test_static_int8_is_not_built_without_calibration(tts):
    with pytest.raises(ValueError, match="calibration"):
        build_s3gen(tts.s3gen, OptimizationConfig(s3gen_quant="int8-static"))


@pytest.mark.slow
def test_static_int8_estimator_runs_int8_kernels_at_any_length(tts, conds, monkeypatch,
                                                               tmp_path):
    """The PT2E flow as built for int8-static: Inductor lowers its quantized Linear layers
    to oneDNN's int8 kernels (only with freezing on while it compiles), one compiled
    package serves every frame count, the mel stays close to fp32, and the package is
    kept for the next build, which loads it without compiling. About 2 minutes here."""
    from torch._dynamo.utils import counters

    from chatterbox_demo.optimizations import (
        StaticInt8Estimator,
        quantize_estimator_static,
        record_estimator_calls,
    )

    # Compiled afresh, not loaded from Inductor's cache, so that its pattern counters count.
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    tokens = conds.gen["prompt_token"][0]
    calls = record_estimator_calls(
        tts.s3gen, lambda: fidelity.mel(tts.s3gen, conds, tokens, 10, cfg=True))
    config = OptimizationConfig(s3gen_quant="int8-static")
    # A package of the format before (named by the calls), which compiling removes.
    (tmp_path / "cfm-estimator-int8-static-04de001e36767193.pt2").write_bytes(b"old")
    counters.clear()
    calibration = optimizations.Calibration(source=conds.gen, record=lambda: calls)
    s3gen = build_s3gen(tts.s3gen, config, lambda: calibration, tmp_path)
    assert isinstance(s3gen.flow.decoder.estimator, StaticInt8Estimator)
    assert not isinstance(tts.s3gen.flow.decoder.estimator, StaticInt8Estimator)
    assert counters["inductor"]["qlinear_weight_prepack_matcher_count"] > 0
    for length in (30, 18):
        part = tokens[:length]
        mel = fidelity.mel(s3gen, conds, part, 10, cfg=True)
        assert fidelity.snr_db(fidelity.mel(tts.s3gen, conds, part, 10, cfg=True), mel) >= 25
    (package,) = tmp_path.iterdir()  # no partial file left beside it, nor the old one
    assert package.suffix == ".pt2"
    # The int8 kernels compute what the quantized graph does run exactly (quantize,
    # dequantize, fp32). On a CPU without an int8 dot product 8-bit activations saturated
    # them: 24 dB from the exact graph (19.6-25.4 dB from fp32, where it was 33.4-38.2).
    call = optimizations._given_inputs(calls)[-1]
    exact = quantize_estimator_static(copy.deepcopy(tts.s3gen.flow.decoder.estimator), calls)
    with torch.no_grad():
        int8 = s3gen.flow.decoder.estimator(**call)
        assert fidelity.snr_db(exact(**call), int8) >= 40
        # The same values as strided views (each a slice of a longer tensor's frames).
        strided = {name: torch.cat([value, value], dim=-1)[..., :value.shape[-1]]
                   if name in optimizations.FRAME_INPUTS else value
                   for name, value in call.items()}
        assert not strided["x"].is_contiguous()
        assert torch.equal(s3gen.flow.decoder.estimator(**strided), int8)

    # The next build (another process, say) loads the package: nothing compiles, and no
    # S3Gen pass records the calibration again.
    def forbidden(*args, **kwargs):
        raise AssertionError("compiled or recorded again")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", forbidden)
    unrecorded = optimizations.Calibration(source=conds.gen, record=forbidden)
    again = build_s3gen(tts.s3gen, config, lambda: unrecorded, tmp_path)
    with torch.no_grad():
        assert torch.equal(again.flow.decoder.estimator(**call), int8)

    # A package that does not load (a truncated file) is compiled again and replaced.
    good = package.read_bytes()
    package.write_bytes(good[:1000])
    compiled = []

    def copying_compile(exported, package_path, **options):
        compiled.append(package_path)
        Path(package_path).write_bytes(good)

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", copying_compile)
    mended = build_s3gen(tts.s3gen, config, lambda: calibration, tmp_path)
    assert len(compiled) == 1 and package.read_bytes() == good
    assert [path.name for path in tmp_path.iterdir()] == [package.name]
    with torch.no_grad():
        assert torch.equal(mended.flow.decoder.estimator(**call), int8)


def test_static_int8_package_is_named_by_weights_and_calibration_source(tts, conds):
    """A kept package is used only for the same flow weights (the estimator's, and the
    encoder's that make its inputs) and the same calibration source (the voice)."""
    from chatterbox_demo.optimizations import _package_key

    flow = tts.s3gen.flow
    key = _package_key(flow, conds.gen)
    assert _package_key(copy.deepcopy(flow), dict(conds.gen)) == key
    other_voice = {**conds.gen, "embedding": conds.gen["embedding"] + 1}
    assert _package_key(flow, other_voice) != key
    for part in ("decoder.estimator", "encoder"):
        retrained = copy.deepcopy(flow)
        with torch.no_grad():
            next(retrained.get_submodule(part).parameters()).add_(1e-3)
        assert _package_key(retrained, conds.gen) != key


def test_a_kept_static_int8_package_is_loaded_without_recording_a_calibration(
        tts, conds, monkeypatch, tmp_path):
    """The package is named by the calibration's source, so a build that finds it runs
    no S3Gen pass to record calls (most of a second process's warm-up at full size)."""
    from chatterbox_demo.optimizations import Calibration, _package_key, compiled_static_int8

    def no_recording():
        raise AssertionError("recorded a calibration")

    package = tmp_path / optimizations.package_name(_package_key(tts.s3gen.flow, conds.gen))
    package.write_bytes(b"kept")
    loaded = []
    monkeypatch.setattr(torch._inductor, "aoti_load_package",
                        lambda path: loaded.append(path) or "the kept estimator")
    calibration = Calibration(source=conds.gen, record=no_recording)
    assert compiled_static_int8(tts.s3gen.flow, calibration, tmp_path) == "the kept estimator"
    assert loaded == [str(package)]


def test_a_cache_that_cannot_keep_the_package_still_compiles(tts, conds, monkeypatch,
                                                             tmp_path):
    """A read-only cache failed the whole preset with an OSError from mkdir; only keeping
    the package for the next build needs the folder (compiling and loading are faked)."""
    from chatterbox_demo.optimizations import Calibration, compiled_static_int8

    monkeypatch.setattr(optimizations, "quantize_estimator_static", lambda est, calls: "q")
    monkeypatch.setattr(optimizations, "_given_inputs", lambda calls: [{}])
    monkeypatch.setattr(optimizations, "_frames_dynamic", lambda example: None)
    monkeypatch.setattr(torch.export, "export", lambda *args, **kwargs: "exported")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda exported, package_path, inductor_configs:
                        Path(package_path).write_bytes(b"package"))
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path: Path(path))
    in_the_way = tmp_path / "compiled"
    in_the_way.write_text("a file where the folder should be")
    calibration = Calibration(source=conds.gen, record=lambda: [{"call": 1}])
    loaded = compiled_static_int8(tts.s3gen.flow, calibration, in_the_way)
    assert loaded.parent != in_the_way and not loaded.exists()  # its scratch folder went
    assert in_the_way.read_text() == "a file where the folder should be"


def test_compiling_removes_only_packages_of_earlier_formats(tmp_path):
    """No build loads an earlier format's package again, so it goes (about 100 MB at full
    size); this format's packages stay whatever their key, and so does another process's
    compile in flight. A partial package of a compile that was killed goes too (no
    ``finally`` runs after SIGKILL, and it stayed for good)."""
    import os

    from chatterbox_demo.files import ABANDONED_AFTER_S
    from chatterbox_demo.optimizations import _remove_older_formats, package_name

    gone = dead_pid()
    kept = [package_name("0" * 16), package_name("1" * 16),
            f"cfm-estimator-int8-static-2222222222222222.partial-{os.getppid()}.pt2",
            f"cfm-estimator-int8-static-4444444444444444.partial-{gone}.pt2",  # just now
            "notes.txt"]
    killed = f"cfm-estimator-int8-static-5555555555555555.partial-{gone}.pt2"
    for name in [*kept, killed, "cfm-estimator-int8-static-04de001e36767193.pt2",
                 "cfm-estimator-int8-static-v1-3333333333333333.pt2"]:
        (tmp_path / name).write_bytes(b"x")
    long_ago = os.path.getmtime(tmp_path / killed) - ABANDONED_AFTER_S - 60
    for name in (kept[2], killed):
        os.utime(tmp_path / name, (long_ago, long_ago))
    _remove_older_formats(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(kept)


def test_static_int8_calibration_follows_from_its_source_whatever_the_random_state(
        tiny_manager):
    """The manager's calibration run draws the CFM's noise from a fixed seed, so its calls
    follow from the voice the package is named by. With the process's own random state
    every process recorded other calls (and, when they named the package, compiled again).
    It leaves that state as it found it."""
    tiny_manager.load()
    calibration = tiny_manager._estimator_calibration()
    assert calibration.source["embedding"] is not None
    first = calibration.record()
    torch.rand(1000)  # another process, another history
    state = torch.random.get_rng_state()
    second = tiny_manager._estimator_calibration().record()
    assert len(first) == len(second) > 0
    for a, b in zip(first, second, strict=True):
        assert all(torch.equal(a[name], b[name]) for name in a if torch.is_tensor(a[name]))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_static_int8_uses_7_bit_activations_without_an_int8_dot_product(
        tts, conds, monkeypatch):
    """On AVX2 alone, oneDNN's int8 kernels sum pairs of products in 16 bits; activations
    must leave that headroom (the x86 quantizer's ``reduce_range``). With VNNI they keep
    all 8 bits, which agree better with fp32."""
    from chatterbox_demo.optimizations import quantize_estimator_static

    calls = optimizations.record_estimator_calls(  # a short two-step pass
        tts.s3gen, lambda: fidelity.mel(tts.s3gen, conds, conds.gen["prompt_token"][0, :8],
                                        2, cfg=True))
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    for dot_product, top in ((False, 127), (True, 255)):
        monkeypatch.setattr(optimizations.hardware, "int8_dot_product",
                            lambda has=dot_product: has)
        graph = quantize_estimator_static(copy.deepcopy(tts.s3gen.flow.decoder.estimator),
                                          calls).graph
        ranges = {node.args[3:5] for node in graph.nodes if node.target == quantize}
        assert ranges == {(0, top)}  # activations, uint8


def test_compiling_s3gen_compiles_what_its_inference_calls(tts, conds, monkeypatch):
    """S3Gen runs HiFT through ``inference()``, which never calls ``forward()``: compiling
    HiFT's forward compiled nothing that runs. The compiled estimator and HiFT decode must
    both be called by a synthesis (a stand-in for torch.compile records the calls)."""
    called = []

    def recording_compile(fn, **options):
        def compiled(*args, **kwargs):
            called.append(fn.__name__)
            return fn(*args, **kwargs)
        return compiled

    monkeypatch.setattr(torch, "compile", recording_compile)
    s3gen = build_s3gen(tts.s3gen, OptimizationConfig(compile_mode="default"))
    tokens = torch.randint(0, 6561, (10,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        s3gen.inference(speech_tokens=tokens, ref_dict=conds.gen)
    assert set(called) == {"forward", "decode"}
    assert called.count("forward") == 10  # the estimator, once per CFM step


def test_compiled_hift_has_no_numpy_integers_in_its_convolutions(tts):
    """Upstream's HiFT gives some convolutions numpy-integer strides; compiled with dynamic
    shapes, Inductor failed on them and ran HiFT's whole decode eager (torch 2.11 and 2.13).
    The compiled copy holds Python ints; the pristine model is left as upstream built it."""
    def conv_settings(module):
        return [value for sub in module.modules() if isinstance(sub, torch.nn.Conv1d)
                for name in ("stride", "padding", "dilation", "kernel_size")
                for value in getattr(sub, name)]

    assert any(type(v) is not int for v in conv_settings(tts.s3gen.mel2wav))
    s3gen = build_s3gen(tts.s3gen, OptimizationConfig(compile_mode="default"))
    assert all(type(v) is int for v in conv_settings(s3gen.mel2wav))
    assert any(type(v) is not int for v in conv_settings(tts.s3gen.mel2wav))


@pytest.mark.parametrize("static_chunk_size", [0, 4])
def test_mask_without_sync_equals_upstreams_helper(static_chunk_size):
    """The same mask as upstream's ``add_optional_chunk_mask`` at the arguments the
    estimator passes. A row with nothing to attend to becomes all True, as upstream's
    warning says it should; upstream itself raises a NameError there (its module calls
    ``logging`` without importing it), so no working upstream run meets such a row."""
    from chatterbox.models.s3gen.utils.mask import add_optional_chunk_mask

    masks = torch.rand(3, 1, 12, generator=torch.Generator().manual_seed(0)) > 0.3
    masks[:, :, 0] = True  # every row attends somewhere: upstream's working case
    xs = torch.zeros(3, 12, 8)
    args = (False, False, 0, static_chunk_size, -1)
    expected = add_optional_chunk_mask(xs, masks.clone(), *args)
    assert torch.equal(optimizations.chunk_mask_without_sync(xs, masks.clone(), *args),
                       expected)
    masks[1] = False  # a padded-out item
    with pytest.raises(NameError):
        add_optional_chunk_mask(xs, masks.clone(), *args)
    filled = optimizations.chunk_mask_without_sync(xs, masks.clone(), *args)
    assert filled[1].all() and torch.equal(filled[[0, 2]], expected[[0, 2]])


def test_estimator_with_mask_without_sync_is_exact_and_compiles_as_one_graph(tts):
    """Rebound, the estimator gives upstream's output bit for bit, and Dynamo traces its
    forward as one graph: upstream's helper broke it at an ``.item()`` per block. Only the
    rebound instance changes."""
    torch.manual_seed(0)
    estimator = copy.deepcopy(tts.s3gen.flow.decoder.estimator).eval()
    frames = 40
    inputs = dict(x=torch.randn(2, 80, frames), mask=torch.ones(2, 1, frames),
                  mu=torch.randn(2, 80, frames), t=torch.rand(2), spks=torch.randn(2, 80),
                  cond=torch.randn(2, 80, frames))
    with torch.inference_mode():
        expected = estimator(**inputs)
        optimizations.use_mask_without_sync(estimator)
        assert torch.equal(estimator(**inputs), expected)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(estimator.forward)(**inputs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    assert "forward" not in vars(tts.s3gen.flow.decoder.estimator)


def test_s3gen_precision_touches_only_the_estimator(tts):
    s3gen = build_s3gen(tts.s3gen, OptimizationConfig(s3gen_dtype="bf16"))
    assert next(s3gen.flow.decoder.estimator.parameters()).dtype == torch.bfloat16
    for part in (s3gen.mel2wav, s3gen.tokenizer, s3gen.speaker_encoder, s3gen.flow.encoder):
        assert next(part.parameters()).dtype == torch.float32


def test_cfm_without_guidance_equals_upstream_with_zero_guidance(tts, conds):
    """Skipping the unconditional half is exact when the guidance rate is 0, and the
    upstream solver is back afterwards."""
    tokens = torch.randint(0, 6561, (20,), generator=torch.Generator().manual_seed(1))
    decoder = tts.s3gen.flow.decoder
    saved = decoder.inference_cfg_rate
    decoder.inference_cfg_rate = 0.0
    try:
        expected = fidelity.mel(tts.s3gen, conds, tokens, 10, cfg=True)
    finally:
        decoder.inference_cfg_rate = saved
    ours = fidelity.mel(tts.s3gen, conds, tokens, 10, cfg=False)
    assert torch.allclose(ours, expected, atol=1e-4)
    assert "solve_euler" not in decoder.__dict__
    with cfm_guidance(tts.s3gen, enabled=False):
        assert "solve_euler" in decoder.__dict__
    assert "solve_euler" not in decoder.__dict__


class RecordingRows(nn.Module):
    """Records, per estimator call, the rows it got, its thread and that thread's torch
    thread count."""

    def __init__(self, estimator: nn.Module):
        super().__init__()
        self.estimator, self.calls = estimator, []

    @property
    def dtype(self) -> torch.dtype:
        return self.estimator.dtype

    def forward(self, **inputs):
        self.calls.append((inputs["x"].shape[0], threading.get_ident(),
                           torch.get_num_threads(), torch.is_inference_mode_enabled()))
        return self.estimator.forward(**inputs)


@pytest.fixture()
def estimator(tts):
    """The tiny S3Gen's estimator, put back (with torch's thread count) after the test."""
    decoder, saved = tts.s3gen.flow.decoder, torch.get_num_threads()
    estimator = decoder.estimator
    yield estimator
    decoder.estimator = estimator
    torch.set_num_threads(saved)


ROW_TOKENS = torch.randint(0, 6561, (20,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("threads", [2, 3])
def test_parallel_rows_compute_each_half_in_its_own_thread_as_the_batch_would(
        tts, conds, estimator, threads):
    """Each half of CFG's batch runs in its own thread on its share of the threads, the
    mel is the batch's, and afterwards the thread count is back."""
    torch.set_num_threads(threads)
    expected = fidelity.mel(tts.s3gen, conds, ROW_TOKENS, 3, cfg=True)
    tts.s3gen.flow.decoder.estimator = recording = RecordingRows(estimator)
    with torch.inference_mode():
        ours = fidelity.mel(tts.s3gen, conds, ROW_TOKENS, 3, cfg=True, parallel_rows=True)
    assert torch.get_num_threads() == threads
    assert tts.s3gen.flow.decoder.estimator is recording
    assert torch.allclose(ours, expected, atol=1e-5)
    assert len(recording.calls) == 6  # 3 steps, 2 halves each
    assert {rows for rows, *_ in recording.calls} == {1}
    assert {inference for *_, inference in recording.calls} == {True}
    for first, second in zip(recording.calls[::2], recording.calls[1::2], strict=True):
        assert first[1] != second[1]
        assert sorted((first[2], second[2])) == sorted((threads - threads // 2, threads // 2))


def test_parallel_rows_leave_a_batch_of_one_and_a_single_thread_alone(tts, conds, estimator):
    tts.s3gen.flow.decoder.estimator = recording = RecordingRows(estimator)
    fidelity.mel(tts.s3gen, conds, ROW_TOKENS, 2, cfg=False, parallel_rows=True)
    torch.set_num_threads(1)
    fidelity.mel(tts.s3gen, conds, ROW_TOKENS, 2, cfg=True, parallel_rows=True)
    assert [rows for rows, *_ in recording.calls] == [1, 1, 2, 2]
    assert {ident for _, ident, *_ in recording.calls} == {threading.get_ident()}


def test_a_failing_row_fails_the_call_and_restores_the_estimator(tts, conds, estimator):
    decoder = tts.s3gen.flow.decoder
    torch.set_num_threads(2)
    with pytest.raises(RuntimeError, match="no row"):
        with optimizations.cfm_parallel_rows(tts.s3gen, True):
            decoder.estimator.estimator = Failing()
            fidelity.mel(tts.s3gen, conds, ROW_TOKENS, 2, cfg=True)
    assert decoder.estimator is estimator
    assert torch.get_num_threads() == 2


class Failing(nn.Module):
    dtype = torch.float32

    def forward(self, **inputs):
        raise RuntimeError("no row")


# --- fidelity promises (docs/benchmarks.md states the same thresholds) ---------------------------

@pytest.mark.parametrize("name", presets_keeping_semantics("cpu"))
def test_presets_keeping_upstream_semantics_agree_with_fp32(tiny_manager, name):
    assert_agrees_with_fp32(tiny_manager, PRESETS[name])


def test_the_fidelity_reference_is_computed_without_tf32(monkeypatch):
    """gpu-fast turns TF32 on for the whole process; the fp32 reference must not use it."""
    seen = []
    monkeypatch.setattr(fidelity, "teacher_forced_logits", lambda *a: seen.append(
        torch.backends.cuda.matmul.allow_tf32))
    monkeypatch.setattr(fidelity, "mel", lambda *a, **k: seen.append(
        torch.backends.cudnn.allow_tf32))
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    fidelity.reference(None, None, None, None, torch.arange(4))
    assert seen == [False, False]
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


def test_manager_switches_without_reloading_and_keeps_voices(tiny_manager, monkeypatch):
    from chatterbox_demo import weights

    monkeypatch.setattr(weights, "load", lambda *a, **k: pytest.fail("weights reloaded"))
    voices = tiny_manager.library.names()
    try:
        for name in ("t3-int8", "baseline", "cpu-fast", "cached"):
            tiny_manager.apply_preset(name)
            assert tiny_manager.preset == name and tiny_manager.config == PRESETS[name]
            assert tiny_manager.library.names() == voices
            result = tiny_manager.generate("Switch check.", "calm-mid",
                                           GenerationParams(max_new_tokens=10))
            assert result.report["preset"] == name
    finally:
        tiny_manager.apply_preset("cached")


def test_unavailable_config_is_refused_and_changes_nothing(tiny_manager):
    before = (tiny_manager.preset, tiny_manager.config)
    with pytest.raises(ValueError, match="cannot run on cpu.*CUDA settings"):
        tiny_manager.apply_preset("gpu-fast")
    assert (tiny_manager.preset, tiny_manager.config) == before


def test_variant_cache_is_bounded_and_says_so(tiny_manager, monkeypatch):
    from chatterbox_demo import manager as manager_module

    monkeypatch.setattr(manager_module, "MAX_VARIANTS", 1)
    tiny_manager.variant(PRESETS["t3-bf16"])
    tiny_manager.variant(PRESETS["t3-int8"])
    # The pristine fp32 T3 stays outside the bound: one copy besides it is kept.
    pristine = tiny_manager.loaded.tts.t3
    assert sum(t3 is not pristine for t3 in tiny_manager._t3_variants.values()) == 1
    assert any("dropped to bound memory" in notice for notice in tiny_manager.notices)


@pytest.mark.slow
def test_compiled_variant_warms_up_on_apply_and_agrees_with_fp32(tiny_manager):
    """torch.compile (default mode, CPU): compiled on apply, not in the first generation,
    and numerically the same model; with the voice prefix kept, as gpu-compiled keeps it
    (its prefill after the prefix has a mask of its own). Compiling costs about 2 minutes
    here."""
    config = dataclasses.replace(PRESETS["t3-voice-prefix"], compile_mode="default")
    try:
        tiny_manager.apply(config)
        assert tiny_manager.last_apply_s > 1.0  # the warm-up compiled something
        tiny_manager.apply(config)
        assert tiny_manager.last_apply_s < 1.0  # and only once
        result = tiny_manager.generate("Compiled.", "calm-mid", GenerationParams(max_new_tokens=12))
        assert result.report["timings"]["build_s"] < 1.0
        assert_agrees_with_fp32(tiny_manager, config, "Compiled.", tokens=30, top1=False)
    finally:
        tiny_manager.apply_preset("cached")
