"""What this CPU does natively, read once at import: it decides which reduced precision
pays off. bf16 without hardware support (AVX512-BF16 or AMX-BF16 on x86, BF16 on Arm) is
emulated and runs slower than fp32: measured here, the CFM estimator took 31 s in bf16
against 11.5 s in fp32 on a Xeon whose hypervisor hides AMX."""

from __future__ import annotations

from pathlib import Path

import torch

BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 flags; "bf16" is Arm's feature name
# bf16 matrix instructions: AMX tiles on x86, BFMMLA on Arm (part of its "bf16" feature).
# With AVX512-BF16's dot products alone (AMD EPYCs, Zen 4 and Zen 5) the bf16 CFM
# estimator was no faster than the int8 dynamic one and 9 dB further from fp32
# (docs/benchmarks.md).
BF16_MATRIX_FLAGS = {"amx_bf16", "bf16"}
# Instructions that multiply int8 by int8 into 32-bit sums (x86 VNNI and AMX, Arm's dot
# product). Without them oneDNN's int8 kernels pair products into 16 bits (AVX2's
# vpmaddubsw), which saturate when activations use all 8 bits.
INT8_DOT_FLAGS = {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp"}


# The flags that pick a path in this package, recorded with every benchmark run: one model
# name ("AMD EPYC") covers CPUs with AVX2 alone and CPUs with AVX-512, VNNI and bf16
# (the benchmark records family and model as well).
PATH_FLAGS = ("avx2", "avx512f", *sorted(BF16_FLAGS | INT8_DOT_FLAGS))


def cpuinfo_fields(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor's fields in Linux's ``cpuinfo`` (it repeats them per core);
    empty where there is no such file."""
    fields: dict[str, str] = {}
    try:
        # errors="replace": a hypervisor may put any bytes in the model name, and this runs
        # at import.
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU feature flags Linux reports (x86 "flags", Arm "Features"); empty elsewhere."""
    fields = cpuinfo_fields(cpuinfo)
    return set(fields.get("flags", fields.get("Features", "")).split())


def path_flags(flags: set[str] | None = None) -> list[str]:
    """Which of :data:`PATH_FLAGS` this CPU has, in that order."""
    flags = cpu_flags() if flags is None else flags
    return [flag for flag in PATH_FLAGS if flag in flags]


def native_bf16(flags: set[str] | None = None) -> bool:
    return _has_any(BF16_FLAGS, flags)


def bf16_matrix_unit(flags: set[str] | None = None) -> bool:
    return _has_any(BF16_MATRIX_FLAGS, flags)


def int8_dot_product(flags: set[str] | None = None) -> bool:
    return _has_any(INT8_DOT_FLAGS, flags)


def _has_any(wanted: set[str], flags: set[str] | None) -> bool:
    """Whether ``flags`` (this CPU's, when None) include any of ``wanted``."""
    return bool(wanted & (cpu_flags() if flags is None else flags))


def has_onednn() -> bool:
    """Whether this PyTorch build has oneDNN (x86 and most Arm builds do), which
    ``t3_onednn`` needs."""
    return torch.backends.mkldnn.is_available()
