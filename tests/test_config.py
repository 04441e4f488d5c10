import dataclasses
import inspect
import math
import re

import pytest
from chatterbox.tts import ChatterboxTTS

from chatterbox_demo.config import (
    DEFAULT_PRESET,
    MAX_TEXT_CHARS,
    PRESETS,
    RANGES,
    GenerationParams,
    OptimizationConfig,
    check_number,
    config_from_spec,
    count_setting,
    default_max_new_tokens,
    get_preset,
)

FIELDS = [f.name for f in dataclasses.fields(GenerationParams)]
INTEGER_FIELDS = ("seed", "max_new_tokens")
OPTIONAL_FIELDS = ("exaggeration", "max_new_tokens")


def test_every_setting_has_a_range():
    assert set(FIELDS) == set(RANGES)


def test_defaults_are_upstream_generate_defaults():
    params = GenerationParams()
    upstream = inspect.signature(ChatterboxTTS.generate).parameters
    for name in ("cfg_weight", "temperature", "top_p", "min_p", "repetition_penalty"):
        assert getattr(params, name) == upstream[name].default, name
    # None = "the voice's own exaggeration" / "derive the budget from the text".
    assert params.exaggeration is None
    assert params.max_new_tokens is None
    assert params.seed == 0


@pytest.mark.parametrize("name", FIELDS)
def test_range_bounds_are_accepted(name):
    low, high = RANGES[name]
    for value in (low, high):
        params = GenerationParams(**{name: value})
        assert getattr(params, name) == value


def test_values_are_normalised_to_their_type():
    params = GenerationParams(temperature=1, seed=7.0, max_new_tokens=30.0, exaggeration=1)
    assert type(params.temperature) is float and params.temperature == 1.0
    assert type(params.exaggeration) is float
    assert type(params.seed) is int and params.seed == 7
    assert type(params.max_new_tokens) is int and params.max_new_tokens == 30


def test_params_are_frozen():
    params = GenerationParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 2.0  # type: ignore[misc]


def _bad_values(name):
    low, high = RANGES[name]
    span = high - low
    values = [
        ("below", low - max(1, span) if name in INTEGER_FIELDS else low - 0.01 * span - 1e-6),
        ("above", high + max(1, span) if name in INTEGER_FIELDS else high + 0.01 * span + 1e-6),
        ("nan", math.nan),
        ("inf", math.inf),
        ("-inf", -math.inf),
        ("string", "0.5"),
        ("bool", True),
        ("list", [1]),
    ]
    if name not in OPTIONAL_FIELDS:
        values.append(("none", None))
    if name in INTEGER_FIELDS:
        values.append(("fraction", low + 0.5))
    return [pytest.param(name, value, label, id=f"{name}-{label}") for label, value in values]


@pytest.mark.parametrize("name,value,label", [p for n in FIELDS for p in _bad_values(n)])
def test_bad_values_are_refused_naming_setting_and_range(name, value, label):
    low, high = RANGES[name]
    with pytest.raises(ValueError) as info:
        GenerationParams(**{name: value})
    message = str(info.value)
    assert message.startswith(f"{name} must be"), message
    if label == "fraction":
        assert "whole number" in message and repr(value) in message, message
    else:
        assert f"between {low} and {high}" in message, message


def test_nan_is_refused_for_every_float_setting():
    # NaN compares false with everything, so a plain "low <= x <= high" check lets it in.
    for name in FIELDS:
        if name in INTEGER_FIELDS:
            continue
        with pytest.raises(ValueError, match=name):
            GenerationParams(**{name: float("nan")})


def test_check_number_direct():
    check_number("x", 0.5, 0, 1)
    check_number("n", 3, 1, 5, integer=True)
    with pytest.raises(ValueError, match=r"^x must be a number between 0 and 1"):
        check_number("x", "a", 0, 1)
    with pytest.raises(ValueError, match=r"^n must be a whole number"):
        check_number("n", 2.5, 1, 5, integer=True)


@pytest.mark.parametrize(("raw", "message"), [
    ("lots", "must be a whole number at least 1 (got 'lots')"),
    ("2.5", "must be a whole number at least 1 (got '2.5')"),
    ("0", "must be at least 1 (got 0)"),
])
def test_a_count_setting_is_read_when_asked_for_and_named_when_bad(monkeypatch, raw, message):
    monkeypatch.delenv("SOME_COUNT", raising=False)
    assert count_setting("SOME_COUNT", 7) == 7
    monkeypatch.setenv("SOME_COUNT", " 12 ")
    assert count_setting("SOME_COUNT", 7) == 12
    monkeypatch.setenv("SOME_COUNT", raw)
    with pytest.raises(ValueError, match=rf"^SOME_COUNT {re.escape(message)}$"):
        count_setting("SOME_COUNT", 7)


def test_default_max_new_tokens_bounds():
    low, high = RANGES["max_new_tokens"]
    floor = default_max_new_tokens("")
    assert floor == 50  # two seconds of speech even for the shortest text
    assert default_max_new_tokens("Hi.") == floor
    # 2.5 tokens per character plus a second of slack.
    assert default_max_new_tokens("a" * 100) == 275
    assert default_max_new_tokens("a" * MAX_TEXT_CHARS) == high
    assert default_max_new_tokens("a" * 10 * MAX_TEXT_CHARS) == high
    budgets = [default_max_new_tokens("a" * n) for n in range(0, MAX_TEXT_CHARS + 1, 7)]
    assert all(low <= b <= high for b in budgets)
    assert budgets == sorted(budgets)  # more text never gets fewer tokens
    assert GenerationParams(max_new_tokens=default_max_new_tokens("a" * 500))  # in range


def test_presets():
    assert {"baseline", "cached", "cpu-fast", "gpu-fast"} <= set(PRESETS)
    assert DEFAULT_PRESET in PRESETS
    assert get_preset("baseline") == OptimizationConfig()
    assert get_preset("cached").cached_conditionals is True
    assert get_preset("cached") != get_preset("baseline")


@pytest.mark.parametrize("name", ["turbo", "", "Baseline"])
def test_unknown_preset_lists_the_available_ones(name):
    with pytest.raises(ValueError) as info:
        get_preset(name)
    message = str(info.value)
    assert repr(name) in message
    assert "available: baseline, cached" in message


def test_a_preset_with_fields_changed():
    spec = ("cached+compile_mode=max-autotune-no-cudagraphs+cfm_steps=8+cfm_cfg=off"
            "+prompt_seconds=3.5+cpu_threads=none")
    assert config_from_spec(spec) == dataclasses.replace(
        get_preset("cached"), compile_mode="max-autotune-no-cudagraphs", cfm_steps=8,
        cfm_cfg=False, prompt_seconds=3.5, cpu_threads=None)
    assert config_from_spec(" cpu-fast ") == get_preset("cpu-fast")
    assert config_from_spec("baseline+cached_conditionals=true") == get_preset("cached")


def test_a_configuration_is_named_by_its_nearest_preset_and_reads_back():
    from chatterbox_demo import config as options
    from chatterbox_demo.config import preset_name

    choices = {"t3_dtype": options.PRECISIONS, "t3_quant": options.T3_QUANTS,
               "t3_decoder": options.T3_DECODERS, "s3gen_dtype": options.PRECISIONS,
               "s3gen_quant": options.S3GEN_QUANTS, "compile_mode": options.COMPILE_MODES,
               "cfm_steps": (4, 10), "prompt_seconds": (3.0, None), "cpu_threads": (1, None)}
    named = 0
    for preset in PRESETS.values():
        for field in dataclasses.fields(OptimizationConfig):
            for value in choices.get(field.name, (True, False)):
                try:
                    config = dataclasses.replace(preset, **{field.name: value})
                except ValueError:
                    continue  # not a valid configuration
                name = preset_name(config)
                assert config_from_spec(name) == config, name
                named += 1
    assert named > 200
    changed = dataclasses.replace(get_preset("cpu-fast"), cfm_steps=4)
    assert preset_name(changed) == "cpu-fast+cfm_steps=4"
    assert preset_name(dataclasses.replace(get_preset("baseline"), prompt_seconds=3.0,
                                           tf32=True)) == "baseline+prompt_seconds=3.0+tf32=true"


@pytest.mark.parametrize("spec, message", [
    ("turbo+cfm_steps=8", "Unknown preset 'turbo'"),
    ("cached+steps=8", "'steps=8' in 'cached+steps=8' is not field=value"),
    ("cached+cfm_steps", "'cfm_steps' in 'cached+cfm_steps' is not field=value"),
    ("cached+cfm_steps=eight", "cfm_steps must be a whole number (got 'eight')"),
    ("cached+cfm_steps=80", "cfm_steps must be between 1 and 50 (got 80)"),
    ("cached+cfm_cfg=maybe", "cfm_cfg must be true or false (got 'maybe')"),
    ("cached+compile_mode=fast", "compile_mode must be one of off, default"),
    ("cached+prompt_seconds=x", "prompt_seconds must be a number (got 'x')"),
    ("cached+t3_dtype=bf16+t3_quant=int8-dynamic", "T3 quantization works from fp32"),
    # int8 dynamic quantizes fp32 Linear layers: on bf16 ones every generation failed
    ("cached+s3gen_dtype=bf16+s3gen_quant=int8-dynamic", "S3Gen quantization works from fp32"),
    ("cached+s3gen_dtype=fp16+s3gen_quant=int8-static", "S3Gen quantization works from fp32"),
    ("cached+cfm_steps=4+cfm_steps=8",
     "cfm_steps is set twice in 'cached+cfm_steps=4+cfm_steps=8'; keep one"),
])
def test_a_changed_preset_that_is_wrong_says_what_is_wrong(spec, message):
    with pytest.raises(ValueError) as info:
        config_from_spec(spec)
    assert str(info.value).startswith(message)


def test_numpy_numbers_are_accepted_as_plain_ones():
    import numpy as np

    params = GenerationParams(seed=np.int64(3), temperature=np.float32(0.5),
                              max_new_tokens=np.int32(40))
    assert params.seed == 3 and type(params.seed) is int
    assert type(params.temperature) is float and type(params.max_new_tokens) is int


def test_cpu_fast_uses_bf16_only_where_the_cpu_has_bf16_matrix_instructions():
    from chatterbox_demo.config import cpu_fast

    with_bf16, without = cpu_fast(True), cpu_fast(False)
    assert (with_bf16.s3gen_dtype, with_bf16.s3gen_quant) == ("bf16", "none")
    assert (without.s3gen_dtype, without.s3gen_quant) == ("fp32", "int8-dynamic")
    for config in (with_bf16, without):
        assert config.t3_quant == "int8-dynamic" and config.t3_decoder == "fast"
        assert config.t3_onednn and not config.changes_output
    # A PyTorch without oneDNN keeps cpu-fast runnable, on the default matmul.
    assert not cpu_fast(False, onednn=False).t3_onednn


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    from chatterbox_demo import hardware

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16\n")
    assert hardware.native_bf16(hardware.cpu_flags(cpuinfo))
    assert hardware.bf16_matrix_unit(hardware.cpu_flags(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")  # Zen 4
    assert hardware.native_bf16(hardware.cpu_flags(cpuinfo))
    assert not hardware.bf16_matrix_unit(hardware.cpu_flags(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not hardware.native_bf16(hardware.cpu_flags(cpuinfo))
    assert hardware.int8_dot_product(hardware.cpu_flags(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx2 fma\n")  # AMD EPYC, Zen 3
    assert not hardware.int8_dot_product(hardware.cpu_flags(cpuinfo))
    assert hardware.path_flags(hardware.cpu_flags(cpuinfo)) == ["avx2"]
    assert hardware.cpu_flags(tmp_path / "missing") == set()
    # Read at import: a model name in another encoding must not stop the app starting.
    cpuinfo.write_bytes("model name\t: Prozessor \u00e9\nflags\t\t: avx2\n".encode("latin-1"))
    assert hardware.cpu_flags(cpuinfo) == {"avx2"}


@pytest.mark.parametrize("value", ["false", None, 0, 1.0])
def test_switches_must_be_true_or_false(value):
    """The A/B tab builds configurations from JSON: the string "false" kept CFG on while
    the run was labelled cfm_cfg=false."""
    with pytest.raises(ValueError, match=f"^cfm_cfg must be true or false \\(got {value!r}\\)"):
        OptimizationConfig(cfm_cfg=value)
    for name in ("cached_conditionals", "t3_onednn", "cuda_graphs", "tf32"):
        with pytest.raises(ValueError, match=f"^{name} must be true or false"):
            OptimizationConfig(**{name: value})


def test_whole_numbers_are_stored_as_ints_and_read_back():
    import numpy as np

    from chatterbox_demo.config import preset_name

    config = OptimizationConfig(cfm_steps=4.0, cpu_threads=np.int64(2))
    assert type(config.cfm_steps) is int and config.cfm_steps == 4
    assert type(config.cpu_threads) is int and config.cpu_threads == 2
    assert preset_name(config) == "baseline+cfm_steps=4+cpu_threads=2"
    assert config_from_spec(preset_name(config)) == config
    assert OptimizationConfig(cpu_threads=None).cpu_threads is None
    with pytest.raises(ValueError, match="cfm_steps must be a whole number"):
        OptimizationConfig(cfm_steps=4.5)
