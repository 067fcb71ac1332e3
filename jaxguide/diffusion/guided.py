"""The guided-denoiser factory: a :class:`~jaxguide.model.denoiser.DenoiserModel` plus a guidance
method as one function of its data, for compiled ensemble programs.

``fn = guided_denoiser(model)`` returns ``fn(x, sigma, params, cond, method, obs) ->
x0_hat`` where everything that changes between analyses is an argument: network
parameters, conditioning (time, SST), the method (a :mod:`jaxguide.diffusion.guidance` dataclass
whose array hyperparameters are traced; ``None`` = the unguided prior) and the
observations (:class:`~jaxguide.diffusion.guidance.Observations`). Build ``fn`` once per model
and pass it, with those operands, to one :class:`~jaxguide.diffusion.ensemble.EnsembleSampler`:
new data then compiles nothing.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax

from jaxguide.model.denoiser import DenoiserModel
from jaxguide.diffusion.guidance import Method, Observations


def guided_denoiser(model: DenoiserModel, *, on_call: Callable[[Any], None] | None = None) -> Callable:
    """``fn(x, sigma, params, cond, method, obs)`` for one member (see the module doc).

    ``on_call(sigma)`` runs on the host at every evaluation (progress reporting); it is
    captured once, so make it a stable function that reads changing state (not a new
    closure per run, which would need a new ``fn`` and so a new compile).
    """

    def fn(x, sigma, params, cond, method: Method | None, obs: Observations | None):
        if on_call is not None:
            jax.debug.callback(on_call, sigma)
        den = functools.partial(model.denoise, params)
        if method is None:
            return den(x, sigma, cond)
        return method(den, obs)(x, sigma, cond)

    return fn
