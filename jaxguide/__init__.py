"""jaxguide: score-based data assimilation with cBottle in JAX.

Layout (one module per concept): healpix, grid_sampling (grid) -> network (Flax port of
cBottle's U-Net) -> model (EDM denoiser, mixture of experts, loading) -> denoiser (the
denoiser contract; conditioning assembly in conditioning) -> guidance (methods as
dataclasses) -> guided (the guided-denoiser factory) -> sampler -> ensemble ->
observations / era5 (data; units: normalisation) -> io, metrics, plots -> evaluation ->
pipeline (orchestration) -> cli.
"""

__version__ = "0.1.0"


def load_model(directory):
    """Load a converted cBottle model (see :func:`jaxguide.model.load_model`)."""
    from jaxguide.model import load_model as _load

    return _load(directory)
