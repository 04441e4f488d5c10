"""Model transforms, one function per optimization, and what can run where.

Each ``apply_*`` takes a module and returns the transformed module; its docstring says
whether it mutates its argument. The manager calls them on deep copies of its pristine
fp32 model, never on the pristine copy itself.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import os
import tempfile
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from chatterbox.models.s3gen import S3Gen
from chatterbox.models.s3gen.utils.mask import add_optional_chunk_mask, subsequent_chunk_mask
from chatterbox.models.t3 import T3
from torch import nn

from . import hardware
from .compiling import compile_hot
from .config import OptimizationConfig
from .files import is_abandoned

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@functools.cache
def torchao_problem() -> str | None:
    """Why torchao cannot be used here (not installed, or fails to import with this
    torch), or None. Imported on first need: it is only for int8 weight-only."""
    try:
        import torchao.quantization  # noqa: F401
    except Exception as exc:  # ImportError, or a torchao built for another torch
        return f"torchao is not usable here ({type(exc).__name__}: {exc})"
    return None


# Compile modes in which Inductor captures CUDA graphs of its own, and the same mode
# without them. T3's layers are always compiled without: Inductor records one graph per
# compiled function and replays it into the same memory, but a layer is one function
# called 30 times per token, and T3's forward keeps every layer's output (hidden states).
# On an H100 its teacher-forced pass failed with "accessing tensor output of CUDAGraphs
# that has been overwritten by a subsequent run". Instead, in these modes the fast decoder
# captures its whole compiled step in CUDA graphs itself (pipeline.step_mode), as with
# ``cuda_graphs``. S3Gen's estimator and HiFT, one call per use, keep the mode as asked.
INDUCTOR_GRAPH_MODES = {"reduce-overhead": "default",
                        "max-autotune": "max-autotune-no-cudagraphs"}


def t3_compile_mode(mode: str) -> str:
    """The mode T3's layers are compiled in for ``compile_mode`` ``mode``."""
    return INDUCTOR_GRAPH_MODES.get(mode, mode)


def unavailable_reason(config: OptimizationConfig, device: str) -> str | None:
    """Why ``config`` cannot run on ``device``, or None when it can. Shown in the UI next to
    the option, and raised by the manager: nothing is silently ignored."""
    reasons = []
    if device != "cpu":
        if config.t3_quant == "int8-dynamic":
            reasons.append("T3 int8-dynamic: torch.ao dynamic quantization has CPU kernels only")
        if config.s3gen_quant == "int8-dynamic":
            reasons.append("S3Gen int8-dynamic: torch.ao dynamic quantization has CPU kernels "
                           "only")
        if config.s3gen_quant == "int8-static":
            reasons.append("S3Gen int8-static: the x86 Inductor quantizer targets CPUs")
        if config.t3_onednn:
            reasons.append("T3 oneDNN: the packed weights are for oneDNN's CPU kernels")
        if config.cfm_parallel_rows:
            reasons.append("CFM rows in parallel: a thread per row is for CPU cores; a GPU "
                           "computes the batch at once")
    if config.t3_quant == "int8-weight-only" and torchao_problem():
        reasons.append(f"T3 int8-weight-only needs torchao: {torchao_problem()}")
    if device == "cpu":
        if config.t3_onednn and not hardware.has_onednn():
            reasons.append("T3 oneDNN: this PyTorch build has no oneDNN")
        if config.t3_dtype == "fp16":
            reasons.append("T3 fp16: no fast fp16 kernels on a CPU; use bf16")
        if config.s3gen_dtype == "fp16":
            reasons.append("S3Gen fp16: no fast fp16 kernels on a CPU; use bf16")
    if device != "cuda" and (config.tf32 or config.cudnn_benchmark):
        reasons.append("TF32 and cudnn.benchmark are CUDA settings")
    if device != "cuda" and config.cuda_graphs:
        reasons.append("CUDA graphs need a CUDA GPU")
    if config.compile_mode in INDUCTOR_GRAPH_MODES and device != "cuda":
        reasons.append(f"compile mode {config.compile_mode} captures CUDA graphs; on "
                       f"{device} use default or max-autotune-no-cudagraphs")
    return "; ".join(reasons) or None


DEFAULT_THREADS = torch.get_num_threads()


def thread_count(config: OptimizationConfig) -> int:
    """The CPU threads ``config`` runs with."""
    return config.cpu_threads or DEFAULT_THREADS


@contextmanager
def threads_while_building(config: OptimizationConfig):
    """Run with ``config``'s thread count, and put the previous one back after. Inductor
    writes the thread count it compiles at into its code (``omp parallel num_threads``),
    so a compile under the previous configuration's count ran at that count for good."""
    before = torch.get_num_threads()
    torch.set_num_threads(thread_count(config))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def apply_runtime_settings(config: OptimizationConfig, device: str) -> None:
    """Process-wide torch settings a configuration asks for (threads; TF32 and cuDNN
    autotuning on CUDA). Mutates global torch state, as these settings are global.

    On CUDA, cuDNN's attention is also left out of SDPA's choice, whatever the
    configuration: it builds a plan per new sequence length, and a decoder's keys grow by
    one each token. On an H100 with torch 2.11 the fast decoder's eager bf16 step ran at
    14.4 tokens/s with it and 48.2 without (docs/benchmarks.md). Flash and memory-
    efficient attention serve the same shapes without a plan."""
    torch.set_num_threads(thread_count(config))
    if device == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32
        torch.backends.cudnn.benchmark = config.cudnn_benchmark


def without_patched_model(t3: T3) -> T3:
    """``T3.inference`` registers a ``patched_model`` wrapper that shares T3's modules; drop
    it so copies and state dicts hold T3 itself only (it is rebuilt on every call).
    Mutates ``t3``."""
    if "patched_model" in t3._modules:
        del t3._modules["patched_model"]
    return t3


def apply_t3_precision(t3: T3, dtype: str) -> T3:
    """Cast T3's weights to ``dtype``. Mutates ``t3``."""
    return t3.to(DTYPES[dtype])


def join_projections(t3: T3) -> list:
    """For the fast decoder: each layer's query, key and value projections become one
    Linear (``qkv_proj``), and the MLP's gate and up projections another
    (``gate_up_proj``), whose output rows are theirs in order. A decode step then makes 4
    matmul calls per layer instead of 7: on a CPU with int8 layers each call also
    quantizes its input; on a GPU each is a kernel launch in a step that launches, not
    reads, set the pace. Returns what :func:`slice_joined` needs. Mutates ``t3``."""
    joined = []
    for layer in t3.tfmr.layers:
        joined.append(_join(layer.self_attn, ("q_proj", "k_proj", "v_proj"), "qkv_proj"))
        joined.append(_join(layer.mlp, ("gate_proj", "up_proj"), "gate_up_proj"))
    return joined


def slice_joined(joined: list) -> None:
    """Give back the separate projection names as slices of the joined layers, for the HF
    forward (which the fidelity check's teacher-forced pass runs)."""
    for parent, names, joined_name, sizes in joined:
        start = 0
        for name, size in zip(names, sizes, strict=True):
            setattr(parent, name, OutputSlice(parent, joined_name, start, start + size))
            start += size


def apply_t3_int8_dynamic(t3: T3, join: bool = False) -> T3:
    """int8 dynamic quantization (torch.ao) of the transformer's Linear layers: weights
    stored as int8 with a scale per output channel, activations quantized per call. CPU
    only. The speech head (1.5% of the weights) stays float: upstream reads ``T3.device``
    from its weight.

    With ``join`` (for the fast decoder), the projections are joined first
    (:func:`join_projections`); per-channel scales make that the same arithmetic as the
    separate layers. Mutates ``t3``."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    joined = join_projections(t3) if join else []
    quantize_dynamic(t3.tfmr, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                     inplace=True)
    # Only now: quantizing would otherwise meet each joined layer once per slice.
    slice_joined(joined)
    return t3


class OutputSlice(nn.Module):
    """One projection of a joined one, for callers that want the separate layers (the
    HF forward): it computes the joined output and keeps its rows. The fast decoder calls
    the joined layer once."""

    def __init__(self, parent: nn.Module, joined_name: str, start: int, end: int):
        super().__init__()
        self.joined_name, self.start, self.end = joined_name, start, end
        # The parent by plain reference, not as a submodule, and the joined layer looked up
        # on each call: a later transform may replace that layer (apply_t3_onednn), and
        # tracing a step fails on oneDNN's packed weights when it meets them twice.
        object.__setattr__(self, "parent", parent)

    @property
    def fused(self) -> nn.Module:
        return getattr(self.parent, self.joined_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.start:self.end]


def _join(parent: nn.Module, names: tuple[str, ...], joined_name: str):
    """Replace ``parent``'s bias-free Linear layers ``names`` by one, ``joined_name``, whose
    output rows are theirs in order; returns what it takes to slice them back out."""
    layers = [getattr(parent, name) for name in names]
    sizes = [layer.out_features for layer in layers]
    weight = torch.cat([layer.weight.detach() for layer in layers])
    joined = nn.Linear(layers[0].in_features, sum(sizes), bias=False,
                       device=weight.device, dtype=weight.dtype)
    joined.weight = nn.Parameter(weight)
    for name in names:
        delattr(parent, name)
    setattr(parent, joined_name, joined)
    return parent, names, joined_name, sizes


# oneDNN's Linear as a TorchScript function: the fast decoder's traced step records calls
# to it, where it could not record the op itself (its empty list of scalars has no type
# that tracing knows). Compiled on first use.
_ONEDNN_SOURCE = """
def onednn_linear(x: Tensor, packed: Tensor, bias: Optional[Tensor]) -> Tensor:
    scalars: List[Optional[number]] = []
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", scalars, "")
"""


@functools.cache
def _onednn_linear():
    return torch.jit.CompilationUnit(_ONEDNN_SOURCE).onednn_linear


class OneDNNLinear(nn.Module):
    """An fp32 ``nn.Linear`` whose weight is packed once into oneDNN's layout for a batch of
    ``rows`` (the decode step's two, for CFG); other batch sizes still work. Computes what
    the Linear does, in another summation order."""

    def __init__(self, linear: nn.Linear, rows: int = 2):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, rows))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    @property
    def weight(self) -> torch.Tensor:
        """The packed weight (oneDNN's layout): its device and dtype are the Linear's, which
        is what upstream reads (``T3.device``)."""
        return self.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _onednn_linear()(x, self.packed, self.bias)


def apply_t3_onednn(t3: T3) -> T3:
    """T3's fp32 Linear layers in the transformer and the speech head, the ones a decode
    step calls, become :class:`OneDNNLinear` (int8 layers are not plain Linear layers and
    stay). A layer that two parents share (a joined projection and its slices) becomes one
    shared module. CPU. Mutates ``t3``."""
    packed = {}

    def swap(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32:
                if id(child) not in packed:
                    packed[id(child)] = OneDNNLinear(child)
                setattr(parent, name, packed[id(child)])
            else:
                swap(child)

    swap(t3.tfmr.layers)
    if type(t3.speech_head) is nn.Linear:
        t3.speech_head = OneDNNLinear(t3.speech_head)
    return t3


def apply_t3_int8_weight_only(t3: T3) -> T3:
    """int8 weight-only quantization (torchao) of the transformer's Linear layers: int8
    weights with a scale per output channel, dequantized inside the matmul; activations
    stay in float. Mutates ``t3``."""
    import torchao.quantization as tq

    # torchao renamed its config functions to classes (Int8WeightOnlyConfig) in 0.10.
    config = getattr(tq, "Int8WeightOnlyConfig", None) or tq.int8_weight_only
    with keeping_process_wide_settings():
        tq.quantize_(t3.tfmr, config())
    return t3


@contextmanager
def keeping_process_wide_settings():
    """Put back fp32 matmul precision and Inductor's options after the block. torchao's
    ``quantize_`` tunes the whole process for its own kernels by default: fp32 matmuls at
    "high" precision (TF32 on CUDA, for every variant, the stock baseline included) and
    Inductor options such as coordinate-descent tuning (slower compiles everywhere). Its
    argument to turn that off is deprecated, so the settings are saved and restored."""
    import torch._inductor.config as inductor_config

    precision, inductor = torch.get_float32_matmul_precision(), inductor_config.save_config()
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        inductor_config.load_config(inductor)


def apply_s3gen_precision(s3gen: S3Gen, dtype: str) -> S3Gen:
    """Cast only the CFM estimator; upstream's solver casts its inputs to the estimator's
    dtype and the result back. Mutates ``s3gen``."""
    s3gen.flow.decoder.estimator.to(DTYPES[dtype])
    return s3gen


def apply_s3gen_int8_dynamic(s3gen: S3Gen) -> S3Gen:
    """int8 dynamic quantization of the CFM estimator's Linear layers, with a weight scale
    per output channel: as fast as one scale per tensor, and closer to fp32 (measured, 100
    tokens: mel SNR 34.7 dB against 31.9). CPU only. Mutates ``s3gen``."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    decoder = s3gen.flow.decoder
    _plain_linears(decoder.estimator)
    decoder.estimator = quantize_dynamic(decoder.estimator,
                                         {nn.Linear: per_channel_dynamic_qconfig},
                                         dtype=torch.qint8)
    return s3gen


# The estimator's inputs whose last dimension is the mel frame count, the one dimension
# that varies between calls (CFG's batch of two and the channels do not).
FRAME_INPUTS = ("x", "mask", "mu", "cond")


def record_estimator_calls(s3gen: S3Gen, run) -> list[dict]:
    """The keyword arguments of every CFM estimator call ``run()`` makes on ``s3gen``: the
    calibration data of :func:`apply_s3gen_int8_static`. Restores the estimator after."""
    estimator = s3gen.flow.decoder.estimator
    forward, calls = estimator.forward, []
    own = estimator.__dict__.get("forward")  # an instance's forward, to put back after

    def recording(**inputs):
        # Upstream's inference runs in inference mode; export needs ordinary tensors.
        with torch.inference_mode(False):
            calls.append({name: value.clone() if torch.is_tensor(value) else value
                          for name, value in inputs.items()})
        return forward(**inputs)

    estimator.forward = recording
    try:
        with torch.no_grad():
            run()
    finally:
        del estimator.forward
        if own is not None:
            estimator.forward = own
    return calls


@dataclass(frozen=True)
class Calibration:
    """What int8-static calibrates its activation scales on. ``record()`` runs S3Gen and
    returns the CFM estimator calls it made (see :func:`record_estimator_calls`);
    ``source`` holds the tensors those calls follow from besides S3Gen's flow weights (a
    voice's conditionals, say). ``record`` must be deterministic in them (its noise from
    a fixed seed): the compiled package is named by ``source``, so that a kept one is
    found without running S3Gen to record the calls again."""

    source: dict[str, torch.Tensor]
    record: Callable[[], list[dict]]


def apply_s3gen_int8_static(s3gen: S3Gen, calibration: Calibration,
                            package_dir: Path | None = None) -> S3Gen:
    """int8 static quantization of the CFM estimator (CPU), the PT2E flow: export the
    estimator with its frame dimension dynamic, observe activations over the recorded
    ``calibration`` calls, convert with the x86 Inductor quantizer's default config (int8
    activations with one scale per tensor, int8 weights with one per output channel), and
    compile ahead of time (AOTInductor) with Inductor's freezing, which folds the weights
    in and lowers each quantized Linear and convolution to oneDNN's int8 kernels.
    Compiling takes minutes at full size; the package is kept in ``package_dir`` (see
    :func:`compiled_static_int8`), so a later build on this machine loads it in a moment,
    without recording the calibration. Mutates ``s3gen``.

    Measured (docs/benchmarks.md): 1.45-1.70x the fp32 estimator and 1.26-1.46x the int8
    dynamic one, mel SNR against fp32 about 34 dB."""
    decoder = s3gen.flow.decoder
    with tempfile.TemporaryDirectory() as scratch:
        decoder.estimator = StaticInt8Estimator(compiled_static_int8(
            s3gen.flow, calibration, package_dir or Path(scratch)))
    return s3gen


def quantize_estimator_static(estimator: nn.Module, calibration: list[dict]) -> nn.Module:
    """The PT2E steps of :func:`apply_s3gen_int8_static`, before compiling: export with the
    frame dimension dynamic, observe the ``calibration`` calls, convert. Returns the
    quantized graph module (it runs eagerly as quantize, dequantize and fp32 ops; Inductor
    with freezing lowers it to int8 kernels)."""
    import torch.ao.quantization.quantizer.x86_inductor_quantizer as xiq
    from torch.ao.quantization.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torch.export import export_for_training

    use_mask_without_sync(estimator)  # export cannot trace upstream's data-dependent .item()
    calls = _given_inputs(calibration)
    exported = export_for_training(estimator, args=(), kwargs=calls[0],
                                   dynamic_shapes=_frames_dynamic(calls[0])).module()
    quantizer = xiq.X86InductorQuantizer()
    # 7-bit activations where the CPU has no int8 dot product: on AVX2 alone, 8-bit ones
    # saturated oneDNN's kernels (the estimator's output 10 dB further from fp32 than
    # the quantized graph computed exactly; docs/benchmarks.md).
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(
        reduce_range=not hardware.int8_dot_product()))
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for call in calls:
            prepared(**call)
    return convert_pt2e(prepared)


def compiled_static_int8(flow: nn.Module, calibration: Calibration, package_dir: Path):
    """``flow``'s CFM estimator quantized on ``calibration`` and compiled ahead of time,
    loaded from its AOTInductor package in ``package_dir``; compiled there first unless a
    package for the same flow weights, calibration source, PyTorch, CPU features and
    thread count is there already (Inductor's generated code is specific to each).
    Written under a temporary name and renamed, so that an interrupted compile leaves no
    package behind; one that fails to load is compiled again."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package
    from torch.export import export

    package = package_dir / package_name(_package_key(flow, calibration.source))
    if package.exists():
        try:
            return aoti_load_package(str(package))
        except Exception as error:  # a truncated or foreign file: build it again
            log.warning("recompiling %s, which did not load: %s", package.name, error)
    if not _writable(package_dir):
        # A read-only cache (or a file in the folder's place): compile all the same, into
        # a folder that goes afterwards; only keeping it for the next build is lost.
        log.warning("cannot keep the compiled estimator in %s (not writable); compiling it "
                    "for this process only", package_dir)
        with tempfile.TemporaryDirectory() as scratch:
            return compiled_static_int8(flow, calibration, Path(scratch))
    calls = calibration.record()
    if not calls:
        raise ValueError("int8-static needs at least one recorded estimator call")
    quantized = quantize_estimator_static(flow.decoder.estimator, calls)
    example = _given_inputs(calls[:1])[0]
    with torch.no_grad():
        exported = export(quantized, args=(), kwargs=example,
                          dynamic_shapes=_frames_dynamic(example))
    partial = package.with_name(f"{package.stem}.partial-{os.getpid()}.pt2")
    try:
        with torch.no_grad():
            aoti_compile_and_package(
                exported, package_path=str(partial), inductor_configs={"freezing": True})
        os.replace(partial, package)
    finally:
        partial.unlink(missing_ok=True)
    _remove_older_formats(package_dir)
    return aoti_load_package(str(package))


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)  # false on a read-only mount too


PACKAGE_PREFIX = "cfm-estimator-int8-static-"


def package_name(key: str) -> str:
    return f"{PACKAGE_PREFIX}v{PACKAGE_FORMAT}-{key}.pt2"


def _remove_older_formats(package_dir: Path) -> None:
    """Delete the packages of earlier formats, which no build will load again (about
    100 MB each at full size), and the partial ones of compiles that were killed. Packages
    of this format stay, whatever their key: another model, voice or thread count may
    still ask for them; so do partial ones of compiles still running."""
    for stale in package_dir.glob(f"{PACKAGE_PREFIX}*.pt2"):
        _, partial, pid = stale.stem.rpartition(".partial-")
        if partial and pid.isdigit():
            if is_abandoned(stale, int(pid)):
                log.info("removing %s, left by a compile that was killed", stale.name)
                stale.unlink(missing_ok=True)
        elif not stale.name.startswith(f"{PACKAGE_PREFIX}v{PACKAGE_FORMAT}-"):
            log.info("removing %s, a compiled package of an earlier format", stale.name)
            stale.unlink(missing_ok=True)


def _package_key(flow: nn.Module, source: dict[str, torch.Tensor]) -> str:
    # The whole flow, not the estimator alone: the calibration calls' inputs come from its
    # encoder too.
    digest = hashlib.sha256(f"{PACKAGE_FORMAT} {torch.__version__} {torch.get_num_threads()} "
                            f"{sorted(hardware.cpu_flags())}".encode())
    tensors = [*flow.state_dict().items(),
               *((f"source.{name}", value) for name, value in sorted(source.items())
                 if value is not None)]
    for name, tensor in tensors:
        tensor = torch.as_tensor(tensor).detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


# Bump when what a package holds changes: the quantizer's settings, the export, or how a
# calibration is recorded from its source (the manager's seed, steps, tokens). 2: named by
# the calibration's source instead of its recorded calls.
PACKAGE_FORMAT = 2


def _given_inputs(calibration: list[dict]) -> list[dict]:
    # The solver passes r=None (meanflow's input, unused here); export takes no None.
    return [{name: value for name, value in call.items() if value is not None}
            for call in calibration]


def _frames_dynamic(call: dict) -> dict:
    from torch.export import Dim

    frames = Dim("frames", min=2, max=20_000)
    return {name: {2: frames} if name in FRAME_INPUTS else None for name in call}


class StaticInt8Estimator(nn.Module):
    """The compiled int8 estimator where upstream's solver expects its estimator: it reads
    ``.dtype`` and calls ``.forward(x=, mask=, mu=, t=, spks=, cond=, r=None)``. The
    package was compiled with only the inputs' frame dimension dynamic, so it serves every
    length."""

    def __init__(self, compiled):
        super().__init__()
        self.compiled = compiled

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def forward(self, x, mask, mu, t, spks=None, cond=None, r=None):
        if r is not None:
            raise ValueError("int8-static was exported without meanflow's r input")
        # The package reads each input in the layout it was exported with, unchecked: a
        # strided view (a slice of a longer call's frames) gave an output as far from
        # fp32's as noise. Upstream's solver passes contiguous tensors, kept as they are.
        inputs = {"x": x, "mask": mask, "mu": mu, "t": t, "spks": spks, "cond": cond}
        with torch.no_grad():
            return self.compiled(**{name: value.contiguous() if torch.is_tensor(value)
                                    else value for name, value in inputs.items()})


def _plain_linears(module: nn.Module) -> None:
    """Swap diffusers' ``LoRACompatibleLinear`` layers that carry no LoRA for ``nn.Linear``
    sharing their weights. The CFM estimator's 56 feed-forward output layers are of that
    subclass, and ``quantize_dynamic`` matches exact types, so it left them in fp32.
    Without a LoRA layer they compute what ``nn.Linear`` does. Mutates ``module``."""
    from diffusers.models.lora import LoRACompatibleLinear

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRACompatibleLinear) and child.lora_layer is None:
                plain = nn.Linear(child.in_features, child.out_features,
                                  bias=child.bias is not None, device="meta")
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)


def apply_compile(module: nn.Module, mode: str, method: str = "forward") -> nn.Module:
    """Compile ``module``'s ``method`` in place (shapes vary per call, so dynamic).
    Mutates ``module``."""
    setattr(module, method, compile_hot(getattr(module, method), mode))
    return module


def t3_variant_key(config: OptimizationConfig) -> tuple:
    """What :func:`build_t3` reads from ``config``: configurations with equal keys share one
    built T3. Projections are joined for the fast decoder only (the stock decoder calls the
    separate ones, which would then each compute the joined output). The compile mode as
    T3 is compiled in it (two modes can give one), and compiled code's thread count."""
    key = (config.t3_dtype, config.t3_quant, t3_compile_mode(config.compile_mode))
    key = (*key, "onednn") if config.t3_onednn else key
    key = (*key, "joined") if joins_projections(config) else key
    return (*key, f"threads={thread_count(config)}") if config.compile_mode != "off" else key


def s3gen_variant_key(config: OptimizationConfig) -> tuple:
    """What :func:`build_s3gen` reads from ``config``, like :func:`t3_variant_key`."""
    key = (config.s3gen_dtype, config.s3gen_quant, config.compile_mode)
    compiled = config.compile_mode != "off" or config.s3gen_quant == "int8-static"
    return (*key, f"threads={thread_count(config)}") if compiled else key


def joins_projections(config: OptimizationConfig) -> bool:
    """Whether the T3 built for ``config`` has joined projections (:func:`join_projections`):
    for the fast decoder, whenever the variant is a copy anyway (int8, another precision,
    oneDNN, compiled). Not for fp32 alone, which the fast decoder shares with the stock one
    rather than hold a second 2 GB copy to save a few calls of a bandwidth-bound step; nor
    for torchao's int8 weight-only layers, quantized in place of the separate ones."""
    return (config.t3_decoder == "fast" and config.t3_quant != "int8-weight-only"
            and not _is_pristine_t3(config))


def _is_pristine_t3(config: OptimizationConfig) -> bool:
    return ((config.t3_dtype, config.t3_quant, config.compile_mode) == ("fp32", "none", "off")
            and not config.t3_onednn)


def build_t3(pristine: T3, config: OptimizationConfig) -> T3:
    """The T3 a configuration needs: the pristine module itself when nothing changes its
    weights, else a transformed copy."""
    if _is_pristine_t3(config):
        return pristine
    t3 = copy.deepcopy(without_patched_model(pristine))
    if config.t3_dtype != "fp32":
        apply_t3_precision(t3, config.t3_dtype)
    if config.t3_quant == "int8-dynamic":
        apply_t3_int8_dynamic(t3, join=joins_projections(config))
    elif joins_projections(config):
        slice_joined(join_projections(t3))
    if config.t3_quant == "int8-weight-only":
        apply_t3_int8_weight_only(t3)
    if config.t3_onednn:
        apply_t3_onednn(t3)
    if config.compile_mode != "off":
        # The stock decoder calls each layer's forward; the fast decoder calls its own
        # per-layer steps, which it compiles when it finds this attribute.
        mode = t3_compile_mode(config.compile_mode)
        for layer in t3.tfmr.layers:
            apply_compile(layer, mode)
        t3.compile_mode = mode
    return t3.eval()


def build_s3gen(pristine: S3Gen, config: OptimizationConfig,
                calibration=None, package_dir: Path | None = None) -> S3Gen:
    """The S3Gen a configuration needs, shared or copied like :func:`build_t3`.
    ``calibration``: for int8-static, a function returning its :class:`Calibration`
    (called only when that variant is built); ``package_dir``: where its compiled
    estimator is kept for the next build (none: compiled for this one only)."""
    if s3gen_variant_key(config) == ("fp32", "none", "off"):
        return pristine
    s3gen = copy.deepcopy(pristine)
    if config.s3gen_dtype != "fp32":
        apply_s3gen_precision(s3gen, config.s3gen_dtype)
    if config.s3gen_quant == "int8-dynamic":
        apply_s3gen_int8_dynamic(s3gen)
    elif config.s3gen_quant == "int8-static":
        if calibration is None:
            raise ValueError("S3Gen int8-static needs calibration calls")
        with threads_while_building(config):  # compiles its estimator, at these threads
            apply_s3gen_int8_static(s3gen, calibration(), package_dir)
    if config.compile_mode != "off":
        if config.s3gen_quant != "int8-static":
            use_mask_without_sync(s3gen.flow.decoder.estimator)
            apply_compile(s3gen.flow.decoder.estimator, config.compile_mode)
        # S3Gen calls HiFT's inference(), never its forward(); inference() spends its time
        # in decode() (upsampling convolutions, residual blocks, iSTFT). The f0 predictor
        # and the sine source that draws random noise before it stay eager.
        plain_int_conv_settings(s3gen.mel2wav)
        apply_compile(s3gen.mel2wav, config.compile_mode, method="decode")
    return s3gen.eval()


def use_mask_without_sync(estimator: nn.Module) -> None:
    """Run this estimator's own (upstream) forward with :func:`chunk_mask_without_sync` in
    place of upstream's mask helper, for this instance only. Mutates ``estimator``.

    The helper ends with ``if (...).sum().item() != 0``, once per transformer block (14
    per CFM step at full size): each ``.item()`` breaks a compiled graph and makes the
    host wait for the device. The forward's code is upstream's; only the name it looks
    the helper up by is bound differently."""
    forward = type(estimator).forward
    scope = {**forward.__globals__, "add_optional_chunk_mask": chunk_mask_without_sync}
    rebound = types.FunctionType(forward.__code__, scope, forward.__name__,
                                 forward.__defaults__, forward.__closure__)
    estimator.forward = types.MethodType(rebound, estimator)


def chunk_mask_without_sync(xs, masks, use_dynamic_chunk, use_dynamic_left_chunk,
                            decoding_chunk_size, static_chunk_size, num_decoding_left_chunks,
                            enable_full_context=True):
    """Upstream's ``add_optional_chunk_mask`` for inference, without its data-dependent
    branch. A row of the mask with nothing to attend to becomes all True, which is what
    upstream's branch means to do; it never runs there (the branch calls ``logging``, which
    its module does not import, and fails), and the estimator's masks have no such row."""
    if use_dynamic_chunk:  # training's random chunks: upstream's own helper
        return add_optional_chunk_mask(xs, masks, use_dynamic_chunk, use_dynamic_left_chunk,
                                       decoding_chunk_size, static_chunk_size,
                                       num_decoding_left_chunks, enable_full_context)
    chunk_masks = masks
    if static_chunk_size > 0:
        chunk = subsequent_chunk_mask(xs.size(1), static_chunk_size, num_decoding_left_chunks,
                                      xs.device)
        chunk_masks = masks & chunk.unsqueeze(0)
    return chunk_masks | (chunk_masks.sum(dim=-1, keepdim=True) == 0)


def plain_int_conv_settings(module: nn.Module) -> None:
    """Make every convolution's stride, padding, dilation and kernel size Python ints.

    HiFT builds its ``source_downs`` convolutions from ``np.cumprod``, so their settings
    are numpy integers. Compiled with ``dynamic=True``, Dynamo lifts such an attribute into
    a symbol, and Inductor cannot lower a convolution whose stride is one: on torch 2.11
    (an H100) and 2.13 it gave up on the whole of ``decode()``, which then ran eager.
    Mutates ``module``."""
    for sub in module.modules():
        if isinstance(sub, nn.modules.conv._ConvNd):
            for name in ("stride", "padding", "dilation", "kernel_size"):
                value = getattr(sub, name)
                if isinstance(value, tuple):  # padding may also be "same" or "valid"
                    setattr(sub, name, tuple(int(v) for v in value))


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; for a tensor subclass (torchao's quantized weights), the sum
    of the plain tensors inside it, not what its logical dtype would take."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def module_bytes(module: nn.Module) -> int:
    """Bytes of parameters and buffers, counting int8 packed weights of quantized Linear
    layers (which are not parameters) too."""
    total = sum(tensor_bytes(t) for t in module.parameters())
    total += sum(tensor_bytes(t) for t in module.buffers())
    for sub in module.modules():
        packed = getattr(sub, "_packed_params", None)
        if packed is not None and hasattr(sub, "weight") and callable(sub.weight):
            weight = sub.weight()
            total += weight.numel() * weight.element_size()
    return total


@contextmanager
def cfm_parallel_rows(s3gen: S3Gen, enabled: bool):
    """Run S3Gen's CFM estimator with the halves of its batch side by side
    (:class:`ParallelRows`, ``enabled``) or as upstream does. Mutates ``s3gen`` until the
    block exits; callers hold the manager's lock, as for :func:`cfm_guidance`."""
    if not enabled:
        yield
        return
    decoder = s3gen.flow.decoder
    estimator = decoder.estimator
    decoder.estimator = ParallelRows(estimator)
    try:
        yield
    finally:
        decoder.estimator = estimator


class ParallelRows(nn.Module):
    """An estimator whose batch is computed in two halves at once: the first in the
    calling thread, the second in a worker thread, each with half of torch's intra-op
    threads; the halves are joined in order. With CFG the halves are the conditional and
    unconditional rows, which share nothing, so each row's arithmetic is the batch's
    (int8 dynamic layers then scale each row's activations by its own range).

    Why: on a 2-core CPU every operator of the estimator (hundreds a call, most of them
    small) is split over both cores, which then wait for each other after each one; a row
    per core never waits. On a 2-core AVX2 EPYC: S3Gen 1.11x in fp32, an int8 estimator
    call 1.09x (docs/benchmarks.md). A batch of one, or a single intra-op thread, runs as
    it is."""

    def __init__(self, estimator: nn.Module):
        super().__init__()
        self.estimator = estimator

    @property
    def dtype(self) -> torch.dtype:
        return self.estimator.dtype

    def forward(self, x, mask, mu, t, spks=None, cond=None, r=None):
        inputs = {"x": x, "mask": mask, "mu": mu, "t": t, "spks": spks, "cond": cond, "r": r}
        threads = torch.get_num_threads()
        if x.shape[0] < 2 or threads < 2:
            return self.estimator.forward(**inputs)
        halves = [{name: None if value is None else value.chunk(2)[half]
                   for name, value in inputs.items()} for half in (0, 1)]
        # Grad and inference modes are per thread: the worker takes the caller's.
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

        def run(half: dict, share: int) -> torch.Tensor:
            torch.set_num_threads(share)  # this thread's OpenMP and MKL teams
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return self.estimator.forward(**half)

        second = _row_worker().submit(run, halves[1], threads // 2)
        try:
            first = run(halves[0], threads - threads // 2)
        finally:
            # Once the worker is done, so that its count cannot land after ours. This also
            # puts back the process-wide count that threads starting later take theirs from.
            wait([second])
            torch.set_num_threads(threads)
        return torch.cat([first, second.result()])


@functools.cache
def _row_worker() -> ThreadPoolExecutor:
    # One long-lived thread: its OpenMP team is made once, not per estimator call.
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfm-row")


@contextmanager
def cfm_guidance(s3gen: S3Gen, enabled: bool):
    """Run S3Gen's CFM with CFG (``enabled``, upstream: nothing changes) or without the
    unconditional half of its batch. Mutates ``s3gen`` until the block exits, then restores
    upstream's solver; callers hold the manager's lock, so no other call sees the change."""
    if enabled:
        yield
        return
    decoder = s3gen.flow.decoder
    decoder.solve_euler = _euler_without_cfg.__get__(decoder)
    try:
        yield
    finally:
        del decoder.solve_euler


def _euler_without_cfg(self, x, t_span, mu, mask, spks, cond, meanflow=False):
    """Upstream's fixed-step Euler solver at batch B (no CFG), same casts as upstream."""
    in_dtype = x.dtype
    dtype = self.estimator.dtype
    x, t_span, mu, mask, spks, cond = (v.to(dtype) if torch.is_tensor(v) else v
                                       for v in (x, t_span, mu, mask, spks, cond))
    for t, r in zip(t_span[:-1], t_span[1:], strict=True):
        t_in = t.unsqueeze(0).expand(x.shape[0])
        dxdt = self.estimator.forward(x=x, mask=mask, mu=mu, t=t_in, spks=spks, cond=cond)
        x = x + (r - t) * dxdt
    return x.to(in_dtype)
