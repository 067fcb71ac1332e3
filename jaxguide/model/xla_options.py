"""XLA compiler options jaxguide compiles its programs with, chosen per backend.

On CPU, XLA (jaxlib 0.10) hands convolutions of a program's entry computation to its
YNNPACK fusions, which ran cBottle's 3x3 face convolutions at about a third of what its
Eigen kernels reach on the same cores (64 vs 200 GFLOP/s at the released width, 2 AMD
EPYC cores; ``benchmarks/conv_forms.py``); convolutions inside loop bodies already took the
Eigen path. The released network's forward went from 17.2 s to 6.2 s on 2 cores with the
YNNPACK fusions off. GPUs keep XLA's defaults (cuDNN convolutions).

The options are per program (``jax.jit(f, compiler_options=...)`` or
``lowered.compile(compiler_options)``), never process-wide: :class:`jaxguide.diffusion.ensemble.EnsembleSampler`
applies them to every ensemble program; pass :func:`compiler_options` yourself when you
``jax.jit`` the network (``model.apply``) directly. A setting of the same option in
``XLA_FLAGS`` wins (it is then left out here).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax

# option -> value, on CPU backends
CPU_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(devices: Sequence[Any] | None = None) -> dict[str, str]:
    """The options for programs that run on ``devices`` (default ``jax.devices()``).

    CPU: :data:`CPU_OPTIONS` less those named in the ``XLA_FLAGS`` environment variable;
    any other platform (or a mix): none.
    """
    devs = tuple(jax.devices() if devices is None else devices)
    if not devs or any(d.platform != "cpu" for d in devs):
        return {}
    flags = os.environ.get("XLA_FLAGS", "")
    return {k: v for k, v in CPU_OPTIONS.items() if k not in flags}
