"""``torch.compile`` for the hot parts, with room for every variant one process builds.

Dynamo keeps compiled code per Python function, not per ``torch.compile`` call, and once a
function has eight versions it runs eagerly for any input the eight do not cover, saying so
only in a log warning. The fast decoder's layer step is one function for every T3 variant
(two versions each: the prefill and the single-token step; another per precision,
quantization, compile mode and projection layout), and HiFT's residual blocks take a version
each (their weight-normed convolutions are each of a class of their own). Measured on the
tiny model on a CPU: the fifth compiled T3 variant in a process ran its layers eagerly, and
a second compiled S3Gen hit the limit in HiFT. The number of variants is bounded by the
configuration's few choices, so the limit is raised to hold them all.
"""

from __future__ import annotations

import torch
import torch._dynamo

# Versions of one compiled function kept per process. The layer step needs the most: 3
# precisions x 3 T3 quantizations x 2 layer compile modes x 3 (prefill, prefill after a
# kept voice prefix, step) x 2 (TF32 on or off, a process-wide setting Dynamo guards on)
# is 108.
RECOMPILE_LIMIT = 160


def compile_hot(function, mode: str):
    """``function`` compiled in ``mode`` ("default" or a ``torch.compile`` mode) with dynamic
    shapes (lengths vary per call), under a recompile limit that holds every variant."""
    config = torch._dynamo.config
    # torch 2.7 renamed cache_size_limit to recompile_limit.
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    options = {} if mode == "default" else {"mode": mode}
    return torch.compile(function, dynamic=True, **options)
