"""jaxguide: score-based data assimilation with cBottle in JAX.

Layout (one module per concept): healpix, grid_sampling (grid) -> network (Flax port of cBottle's
U-Net) -> model (EDM denoiser, mixture of experts, loading) -> guidance -> sampler ->
ensemble -> observations / conditioning / era5 (data) -> io, metrics, plots -> evaluation -> cli.
"""

__version__ = "0.1.0"


def load_model(directory):
    """Load a converted cBottle model (see :func:`jaxguide.model.load_model`)."""
    from jaxguide.model import load_model as _load

    return _load(directory)
