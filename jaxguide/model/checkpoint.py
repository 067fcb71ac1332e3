"""A converted cBottle model: parameters as a plain pytree plus a pure ``apply``.

``load_model(DIR)`` reads what ``jaxguide convert`` wrote. The mixture of experts of the
released coarse model (several checkpoints, each used in a band of sigma) is routed
inside ``jit`` exactly as cBottle does: expert ``i`` for the first ``i`` with
``sigma >= thresholds[i]``, else the last; a batch is routed by its first sigma.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxguide.model.config import BatchInfo, ModelConfig
from jaxguide.model.inputs import Conditioning, ForwardOptions
from jaxguide.model.precond import precond_forward
from jaxguide.model.unet import CBottleUNet

log = logging.getLogger(__name__)

METADATA_FILE = "jaxguide.json"
PARAMS_DIR = "params"
FORMAT_VERSION = 1

Params = Any  # a nested dict of arrays (one per expert)


class ModelLoadError(ValueError):
    """A converted model directory is missing, corrupted or inconsistent."""


@functools.lru_cache(maxsize=8)
def graphdef_and_shapes(config: ModelConfig):
    """The NNX graph definition and the parameter shapes, without allocating weights."""
    abstract = nnx.eval_shape(lambda: CBottleUNet(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, nnx.to_pure_dict(state)


def init_params(config: ModelConfig, seed: int = 0) -> Params:
    """Random parameters (for tests and benchmarks at any size)."""
    model = CBottleUNet(config, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.split(model)[1])


def count_params(config: ModelConfig) -> int:
    _, shapes = graphdef_and_shapes(config)
    return int(sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)))


def _expert_apply(graphdef, params, x, sigma, cond: Conditioning, options: ForwardOptions):
    model = nnx.merge(graphdef, nnx.State(params))
    return precond_forward(model, x, sigma, cond, options)


def expert_index(sigma: jax.Array, thresholds: tuple[float, ...], n_experts: int) -> jax.Array:
    """cBottle's routing: first i with sigma[0] >= thresholds[i], else the last expert."""
    s0 = jnp.reshape(jnp.asarray(sigma), (-1,))[0]
    if not thresholds:
        return jnp.asarray(0, jnp.int32)
    hit = s0 >= jnp.asarray(thresholds, s0.dtype)
    return jnp.where(jnp.any(hit), jnp.argmax(hit), n_experts - 1).astype(jnp.int32)


def make_apply(config: ModelConfig, sigma_thresholds: tuple[float, ...]) -> Callable:
    """Pure ``apply(params, x, sigma, *, class_labels, condition, second_of_day, day_of_year)``.

    ``params`` is a tuple with one parameter tree per expert. Shapes (cBottle layout,
    network pixel order, normalised units; T = ``config.time_length``, 1 for the image
    model): x (B, C, T, 49152), sigma scalar or (B,), class_labels (B, label_dim),
    condition (B, condition_channels, T, 49152), second_of_day and day_of_year (B, T).
    Instead of those four keywords a built :class:`~jaxguide.model.inputs.Conditioning`
    can be passed as ``cond=``. Returns D (B, C, T, 49152), float32 unless
    ``compute_dtype`` is float64. ``remat=True`` recomputes each U-Net block in the
    backward pass: a VJP through D (guidance) then needs far less memory (same values).
    jit/vmap/grad friendly. The inputs become one ``Conditioning`` pytree and one static
    ``ForwardOptions`` here, passed unchanged to every layer below.
    """
    graphdef, _ = graphdef_and_shapes(config)
    thresholds = tuple(float(t) for t in sigma_thresholds)

    def apply(
        params: tuple,
        x,
        sigma,
        *,
        class_labels=None,
        condition=None,
        second_of_day=None,
        day_of_year=None,
        cond: Conditioning | None = None,
        compute_dtype=jnp.float32,
        remat: bool = False,
    ):
        if cond is None:
            if second_of_day is None or day_of_year is None:
                raise TypeError("apply() needs second_of_day and day_of_year (or cond=Conditioning(...))")
            cond = Conditioning(second_of_day, day_of_year, class_labels, condition)
        elif any(v is not None for v in (class_labels, condition, second_of_day, day_of_year)):
            raise TypeError("apply() takes either cond= or the conditioning keywords, not both")
        run = functools.partial(_expert_apply, graphdef, options=ForwardOptions(compute_dtype, remat))
        if len(params) == 1:
            return run(params[0], x, sigma, cond)
        branches = [functools.partial(lambda i, ps, *a: run(ps[i], *a), i) for i in range(len(params))]
        idx = expert_index(sigma, thresholds, len(params))
        return jax.lax.switch(idx, branches, params, x, sigma, cond)

    return apply


@dataclasses.dataclass(frozen=True)
class CBottleModel:
    """A loaded model. ``apply`` is pure; ``denoise`` binds ``params``.

    Arrays are in cBottle's network layout (batch, channel, time, pixel) (time =
    ``config.time_length`` frames, 1 for the image model), pixels in
    the network's HEALPix order (``healpix`` order "net"), values normalised per channel
    with ``batch_info`` (value - center) / scale.
    """

    config: ModelConfig
    batch_info: BatchInfo
    sigma_thresholds: tuple[float, ...]
    params: tuple
    metadata: dict = dataclasses.field(default_factory=dict, compare=False)

    @functools.cached_property
    def apply(self) -> Callable:
        return make_apply(self.config, self.sigma_thresholds)

    def denoise(self, x, sigma, **conditioning):
        """D(x; sigma) with this model's parameters; conditioning as in ``apply``."""
        return self.apply(self.params, x, sigma, **conditioning)

    @property
    def channels(self) -> tuple[str, ...]:
        return self.batch_info.channels


def load_model(directory: str | os.PathLike) -> CBottleModel:
    """Load a model written by ``jaxguide convert``; named errors for bad directories."""
    import orbax.checkpoint as ocp

    d = Path(directory)
    if d.is_file():
        import zipfile

        if zipfile.is_zipfile(d):
            raise ModelLoadError(
                f"{str(d)!r} is a cBottle checkpoint (a zip file), not a converted model directory: convert it "
                f"first with `jaxguide convert {d} --out MODEL_DIR` and pass --model MODEL_DIR")
        raise ModelLoadError(f"{str(d)!r} is a file; --model takes a model directory written by `jaxguide convert`")
    if not d.is_dir():
        raise ModelLoadError(f"model directory {d} does not exist (convert a checkpoint with `jaxguide convert`)")
    meta_path = d / METADATA_FILE
    if not meta_path.exists():
        raise ModelLoadError(f"{d} is not a jaxguide model directory: {METADATA_FILE} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{meta_path} is corrupted: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{meta_path}: unsupported format_version {meta.get('format_version')!r}")
    config = ModelConfig.from_dict(meta["model_config"])
    config.check_supported()
    batch_info = BatchInfo.from_dict(meta["batch_info"])
    thresholds = tuple(float(t) for t in meta.get("sigma_thresholds", []))
    n_experts = int(meta["n_experts"])
    _, shapes = graphdef_and_shapes(config)
    target = {f"expert_{i}": jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes) for i in range(n_experts)}
    try:
        restored = ocp.PyTreeCheckpointer().restore((d / PARAMS_DIR).absolute())
    except Exception as e:  # orbax raises assorted types for damaged files
        raise ModelLoadError(f"cannot read parameters in {d / PARAMS_DIR}: {e}") from None
    expect = jax.tree_util.tree_structure(target)
    if jax.tree_util.tree_structure(restored) != expect:
        raise ModelLoadError(f"parameters in {d / PARAMS_DIR} do not match the model config in {meta_path}")
    params = []
    for i in range(n_experts):
        tree = restored[f"expert_{i}"]
        for (keypath, got), want in zip(
            jax.tree_util.tree_leaves_with_path(tree),
            jax.tree_util.tree_leaves(shapes),
        ):
            if tuple(got.shape) != tuple(want.shape):
                raise ModelLoadError(
                    f"expert {i} parameter {jax.tree_util.keystr(keypath)} has shape {got.shape}, "
                    f"the config needs {want.shape}"
                )
        params.append(jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), tree))
    return CBottleModel(config, batch_info, thresholds, tuple(params), meta)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
