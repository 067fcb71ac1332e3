"""Ensembles of diffusion samples in one jitted program, optionally sharded over devices.

An :class:`EnsembleSampler` splits one key into ``n_members`` keys and runs the sampler
for every member with ``jax.vmap`` (or ``jax.lax.map`` in chunks of ``chunk_size``
members, to bound memory) inside a single ``jax.jit``. With more than one device the
member axis is sharded over a 1-D mesh ``("member",)`` with ``jax.shard_map``: each
device runs its own members, no communication; the result carries
``NamedSharding(mesh, PartitionSpec("member"))``. ``n_members`` must be a multiple of
the device count (a ``ValueError`` says so; no silent padding).

Compile once per configuration: the sampler object owns its compiled programs, one per
(denoiser function, member shape, member count, sampler options, devices, chunk
size); everything that changes between calls (network parameters, conditioning,
observations, guidance hyperparameters) is passed through ``operands`` as traced
arguments, so new values compile nothing (new shapes or pytree structures do). Keep one
sampler (and one denoiser function) for a series of calls; the programs, and the
denoiser functions they were built from, live as long as the sampler object (no
module-global cache). :func:`sample_ensemble` is the one-shot form (a fresh sampler:
compiles every call). :func:`count_compiles` counts XLA compilations (tests, benchmarks).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

Denoiser = Callable[..., Any]

MEMBER_AXIS = "member"


def _default_sampler():
    from jaxguide.sampler import sample  # lazy: the sampler module is written in parallel

    return sample


def _freeze(value):
    """Hashable version of nested sampler options (dicts, lists, arrays of scalars)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (np.ndarray, jax.Array)):
        arr = np.asarray(value)
        return ("array", arr.dtype.str, arr.shape, arr.tobytes())
    return value


def _thaw(value):
    """Inverse of :func:`_freeze` for the values it produces (dicts come back as tuples of pairs)."""
    if isinstance(value, tuple) and len(value) == 4 and value[0] == "array":
        return np.frombuffer(value[3], dtype=np.dtype(value[1])).reshape(value[2])
    if isinstance(value, tuple):
        return tuple(_thaw(v) for v in value)
    return value


def _strong(a) -> jax.Array:
    """``a`` as an array without JAX's weak type (same dtype)."""
    a = jnp.asarray(a)
    return a.astype(a.dtype)


def resolve_devices(devices: Sequence[Any] | None) -> tuple[Any, ...]:
    """The devices to shard over: the given ones, else all of ``jax.devices()``."""
    devs = tuple(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("no devices given")
    return devs


def _build(denoiser_fn, sampler, member_shape, n_members, frozen_kwargs, devices, chunk_size):
    kwargs = {k: _thaw(v) for k, v in frozen_kwargs}

    def members(keys, operands):
        def den(x, sigma):
            return denoiser_fn(x, sigma, *operands)

        def one(k):
            return sampler(den, k, member_shape, **kwargs)

        if chunk_size is None:
            return jax.vmap(one)(keys)
        return jax.lax.map(one, keys, batch_size=chunk_size)

    if len(devices) > 1:
        mesh = Mesh(np.asarray(devices), (MEMBER_AXIS,))
        spec = PartitionSpec(MEMBER_AXIS)
        sharded = jax.shard_map(members, mesh=mesh, in_specs=(spec, PartitionSpec()), out_specs=spec, check_vma=False)
        out_sharding = NamedSharding(mesh, spec)

        def program(key, operands):
            keys = jax.random.split(key, n_members)
            return sharded(keys, operands)

        logger.debug("ensemble program: %d members sharded over %d devices", n_members, len(devices))
        return jax.jit(program, out_shardings=out_sharding)

    def program(key, operands):
        return members(jax.random.split(key, n_members), operands)

    return jax.jit(program)


class EnsembleSampler:
    """Ensemble programs compiled once per configuration and kept by this object.

    ``sampler``: ``sampler(denoiser, key, shape, **sampler_kwargs)``; default
    :func:`jaxguide.sampler.sample`. Call it like :func:`sample_ensemble`.
    """

    def __init__(self, sampler: Callable[..., Any] | None = None):
        self.sampler = _default_sampler() if sampler is None else sampler
        self._programs: dict[tuple, Callable] = {}

    @property
    def num_programs(self) -> int:
        """Configurations built so far (each compiles on its first call per operand shapes)."""
        return len(self._programs)

    def clear(self) -> None:
        """Drop the compiled programs (and the denoiser functions they hold)."""
        self._programs.clear()

    def __call__(
        self,
        denoiser_fn: Denoiser,
        key: jax.Array,
        member_shape: tuple[int, ...],
        n_members: int,
        *,
        sampler_kwargs: dict[str, Any],
        devices: Sequence[Any] | None = None,
        chunk_size: int | None = None,
        operands: Any = (),
    ) -> jax.Array:
        """Sample ``n_members`` members; returns (n_members, *member_shape).

        Args:
          denoiser_fn: ``denoiser_fn(x, sigma, *operands) -> x0_hat`` for one member,
            x of ``member_shape`` (e.g. (C, 1, npix), normalised, net order). Its
            identity is part of the configuration: reuse the same function object.
          key: one PRNG key; member ``i`` uses ``jax.random.split(key, n_members)[i]``.
          member_shape: shape of one member.
          n_members: ensemble size M; a multiple of the device count when sharded.
          sampler_kwargs: keyword options of the sampler (num_steps, sigma_min, ...);
            static (part of the compiled configuration).
          devices: devices for the member axis; default all of ``jax.devices()``. One
            device means no sharding.
          chunk_size: run members ``chunk_size`` at a time (``jax.lax.map``) instead of
            all at once (per device when sharded).
          operands: tuple (pytree) of arrays passed to the denoiser as traced arguments
            (parameters, conditioning, guidance method, observations): new values do
            not recompile; weak types are stripped first.
        """
        if n_members < 1:
            raise ValueError(f"n_members must be >= 1, got {n_members}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        devs = resolve_devices(devices)
        if len(devs) > 1 and n_members % len(devs):
            raise ValueError(
                f"n_members={n_members} is not a multiple of the {len(devs)} devices; "
                f"use a multiple of {len(devs)} or pass devices= explicitly"
            )
        config = (
            denoiser_fn,
            tuple(int(s) for s in member_shape),
            int(n_members),
            _freeze(dict(sampler_kwargs)),
            devs if len(devs) > 1 else (),
            None if chunk_size is None else int(chunk_size),
        )
        program = self._programs.get(config)
        if program is None:
            program = self._programs[config] = _build(config[0], self.sampler, *config[1:])
        # strip weak types so that e.g. jnp.full(shape, 5.0) and a concrete array share a program
        operands = jax.tree_util.tree_map(_strong, tuple(operands))
        return program(key, operands)


def sample_ensemble(
    denoiser_fn: Denoiser,
    key: jax.Array,
    member_shape: tuple[int, ...],
    n_members: int,
    *,
    sampler_kwargs: dict[str, Any],
    devices: Sequence[Any] | None = None,
    chunk_size: int | None = None,
    operands: tuple = (),
    sampler: Callable[..., Any] | None = None,
) -> jax.Array:
    """One ensemble with a fresh :class:`EnsembleSampler` (see its ``__call__``).

    Compiles on every call: for a series of calls keep one ``EnsembleSampler``.
    """
    return EnsembleSampler(sampler)(denoiser_fn, key, member_shape, n_members, sampler_kwargs=sampler_kwargs,
                                    devices=devices, chunk_size=chunk_size, operands=operands)


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
    """Collect the durations (s) of the XLA backend compilations inside the block.

    ``with count_compiles() as c: ...`` then ``len(c)`` is the number of programs
    compiled (cache hits of ``jit`` do not count). Uses ``jax.monitoring``.
    """
    seen: list[float] = []

    def listener(event, duration, **_):
        if event == BACKEND_COMPILE_EVENT:
            seen.append(float(duration))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
