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
compiles every call). The arguments of a call are the fields of :class:`EnsembleRequest`,
for all three entries (``EnsembleSampler(...)``, ``prepare``, ``sample_ensemble``).
:func:`count_compiles` counts XLA compilations (tests, benchmarks).

Several programs (e.g. an analysis and a prior ensemble) compile concurrently with
:meth:`EnsembleSampler.compile_many` (``prepare`` each call, compile them all, ``run``
each): XLA compiles in worker threads without the GIL, so on 2 cores two programs take
about the time of the larger one instead of the sum. The programs are compiled ahead of
time (``jit(...).lower(...).compile()``), keyed by configuration and argument shapes,
with :func:`jaxguide.model.xla_options.compiler_options` for the devices they run on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxguide.diffusion.sampler import sample
from jaxguide.model import xla_options

logger = logging.getLogger(__name__)

Denoiser = Callable[..., Any]

MEMBER_AXIS = "member"


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


def describe_devices(devices: Sequence[Any] | None = None) -> str:
    """The devices a run uses, for its first progress line: ``"1 gpu device (NVIDIA H100
    80GB HBM3)"``, ``"2 cpu devices (cpu)"`` (default: all of ``jax.devices()``)."""
    devs = resolve_devices(devices)
    parts = []
    for platform in sorted({d.platform for d in devs}):
        of = [d for d in devs if d.platform == platform]
        kinds = ", ".join(sorted({str(getattr(d, "device_kind", platform)) for d in of}))
        parts.append(f"{len(of)} {platform} device{'s' if len(of) > 1 else ''} ({kinds})")
    return " + ".join(parts)


def _split(operands, per_member):
    per_member = per_member or (False,) * len(operands)
    shared = tuple(None if m else o for o, m in zip(operands, per_member))
    own = tuple(o if m else None for o, m in zip(operands, per_member))
    return shared, own


def _join(shared, own, per_member):
    per_member = per_member or (False,) * len(shared)
    return tuple(o if m else s for s, o, m in zip(shared, own, per_member))


def _build(denoiser_fn, sampler, member_shape, n_members, frozen_kwargs, devices, chunk_size, per_member=None):
    kwargs = {k: _thaw(v) for k, v in frozen_kwargs}

    def members(keys, shared, own):
        def one(k, own_one):
            operands = _join(shared, own_one, per_member)

            def den(x, sigma):
                return denoiser_fn(x, sigma, *operands)

            return sampler(den, k, member_shape, **kwargs)

        if chunk_size is None:
            return jax.vmap(one)(keys, own)
        return jax.lax.map(lambda a: one(*a), (keys, own), batch_size=chunk_size)

    if len(devices) > 1:
        mesh = Mesh(np.asarray(devices), (MEMBER_AXIS,))
        spec = PartitionSpec(MEMBER_AXIS)
        sharded = jax.shard_map(members, mesh=mesh, in_specs=(spec, PartitionSpec(), spec), out_specs=spec,
                                check_vma=False)
        out_sharding = NamedSharding(mesh, spec)

        def program(key, operands):
            keys = jax.random.split(key, n_members)
            return sharded(keys, *_split(operands, per_member))

        logger.debug("ensemble program: %d members sharded over %d devices", n_members, len(devices))
        return jax.jit(program, out_shardings=out_sharding)

    def program(key, operands):
        return members(jax.random.split(key, n_members), *_split(operands, per_member))

    return jax.jit(program)


@dataclasses.dataclass(frozen=True, eq=False)
class EnsembleRequest:
    """The inputs of one ensemble call: the one signature of :meth:`EnsembleSampler.__call__`,
    :meth:`EnsembleSampler.prepare` and :func:`sample_ensemble` (each takes these fields as
    its arguments). Checked on construction.

    Fields:
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
      per_member: one flag per operand: True for an operand whose every leaf has a
        leading ``n_members`` axis, member ``i`` getting entry ``i`` (e.g. each
        member's own conditioning frames in a chained video run); default none.
        Stored as a tuple of bools, one per operand.
    """

    denoiser_fn: Denoiser
    key: jax.Array
    member_shape: tuple[int, ...]
    n_members: int
    _: dataclasses.KW_ONLY
    sampler_kwargs: dict[str, Any]
    devices: Sequence[Any] | None = None
    chunk_size: int | None = None
    operands: Any = ()
    per_member: Sequence[bool] | None = None

    def __post_init__(self):
        n_members, chunk_size = self.n_members, self.chunk_size
        if n_members < 1:
            raise ValueError(f"n_members must be >= 1, got {n_members}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        operands = tuple(self.operands)
        per_member = self.per_member
        per_member = (False,) * len(operands) if per_member is None else tuple(bool(m) for m in per_member)
        if len(per_member) != len(operands):
            raise ValueError(f"per_member has {len(per_member)} flags for {len(operands)} operands")
        for i, m in enumerate(per_member):
            if m:
                bad = [np.shape(x) for x in jax.tree_util.tree_leaves(operands[i]) if np.shape(x)[:1] != (n_members,)]
                if bad:
                    raise ValueError(f"operand {i} is per member but has leaves of shapes {bad} "
                                     f"(each needs a leading axis of n_members={n_members})")
        object.__setattr__(self, "operands", operands)
        object.__setattr__(self, "per_member", per_member)


def _takes_request(fn: Callable) -> Callable:
    """``fn(*head, request, **extra)`` called as ``fn(*head, <EnsembleRequest's arguments>, **extra)``
    (or with a built :class:`EnsembleRequest` in the request's place).

    ``head``: ``self`` for a method; ``extra``: keyword-only parameters of ``fn`` after
    the request. The signature shown by ``help``/``inspect`` is the request's, so the call
    signature is written once (:class:`EnsembleRequest`).
    """
    params = list(inspect.signature(fn).parameters.values())
    at = [p.name for p in params].index("request")
    head, extra = params[:at], params[at + 1:]
    extra_names = {p.name for p in extra}
    fields = list(inspect.signature(EnsembleRequest).parameters.values())

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in extra_names}
        rest = args[len(head):]
        if len(rest) == 1 and isinstance(rest[0], EnsembleRequest) and not kwargs:
            request = rest[0]
        else:
            request = EnsembleRequest(*rest, **kwargs)
        return fn(*args[:len(head)], request, **own)

    wrapper.__signature__ = inspect.signature(fn).replace(parameters=[*head, *fields, *extra])
    return wrapper


class EnsembleSampler:
    """Ensemble programs compiled once per configuration and kept by this object.

    ``sampler``: ``sampler(denoiser, key, shape, **sampler_kwargs)``; default
    :func:`jaxguide.diffusion.sampler.sample`. Call it like :func:`sample_ensemble`.
    """

    def __init__(self, sampler: Callable[..., Any] | None = None):
        self.sampler = sample if sampler is None else sampler
        self._programs: dict[tuple, Callable] = {}
        self._compiled: dict[tuple, Any] = {}  # (config, argument signature) -> jax.stages.Compiled

    @property
    def num_programs(self) -> int:
        """Configurations built so far (each compiles on its first call per operand shapes)."""
        return len(self._programs)

    def clear(self) -> None:
        """Drop the compiled programs (and the denoiser functions they hold)."""
        self._programs.clear()
        self._compiled.clear()

    @_takes_request
    def __call__(self, request: EnsembleRequest) -> jax.Array:
        """Sample ``n_members`` members; returns (n_members, *member_shape). Arguments:
        the fields of :class:`EnsembleRequest`."""
        call = self._bind(request)
        self.compile_many([call])
        return self.run(call)

    @_takes_request
    def prepare(self, request: EnsembleRequest) -> "EnsembleCall":
        """Check and bind one call (arguments as :meth:`__call__`: the fields of
        :class:`EnsembleRequest`) without compiling or running it: for
        :meth:`compile_many` then :meth:`run`."""
        return self._bind(request)

    def _bind(self, request: EnsembleRequest) -> "EnsembleCall":
        devs = resolve_devices(request.devices)
        n_members, chunk_size = request.n_members, request.chunk_size
        if len(devs) > 1 and n_members % len(devs):
            raise ValueError(
                f"n_members={n_members} is not a multiple of the {len(devs)} devices; "
                f"use a multiple of {len(devs)} or pass devices= explicitly"
            )
        config = (
            request.denoiser_fn,
            tuple(int(s) for s in request.member_shape),
            int(n_members),
            _freeze(dict(request.sampler_kwargs)),
            devs if len(devs) > 1 else (),
            None if chunk_size is None else int(chunk_size),
            request.per_member,
        )
        # strip weak types so that e.g. jnp.full(shape, 5.0) and a concrete array share a program
        operands = jax.tree_util.tree_map(_strong, request.operands)
        leaves, treedef = jax.tree_util.tree_flatten((request.key, operands))
        signature = (treedef, tuple((tuple(np.shape(x)), str(x.dtype)) for x in leaves))
        return EnsembleCall(config, signature, request.key, operands)

    def is_compiled(self, call: "EnsembleCall") -> bool:
        """Whether ``call``'s program is compiled already (running it compiles nothing)."""
        return (call.config, call.signature) in self._compiled

    def compile_many(self, calls: Sequence["EnsembleCall"], *,
                     on_compiled: Callable[[int, float], None] | None = None) -> list[float]:
        """Compile the programs of ``calls`` (from :meth:`prepare`) that are not compiled
        yet, concurrently: each is traced and lowered in turn on this thread (Python,
        holds the GIL) and handed to a worker thread for the XLA compilation (or JAX
        persistent-cache load), which releases the GIL, so the next program is lowered,
        and all compile, while the first compiles. Results are bit-identical to compiling
        one after the other (same programs, same compiler).

        Returns the seconds from the start of this call until each call's program was
        ready (0.0 for those compiled before). ``on_compiled(i, seconds)`` runs on the
        worker thread as call ``i`` finishes compiling.
        """
        import concurrent.futures

        t0 = time.perf_counter()
        seconds = [0.0] * len(calls)
        pending: dict[tuple, list[int]] = {}
        for i, c in enumerate(calls):
            if (c.config, c.signature) not in self._compiled:
                pending.setdefault((c.config, c.signature), []).append(i)
        if not pending:
            return seconds

        def compile_one(lowered, idx, options):
            compiled = lowered.compile(options)
            s = time.perf_counter() - t0
            for i in idx:
                seconds[i] = s
                if on_compiled is not None:
                    on_compiled(i, s)
            return compiled

        with concurrent.futures.ThreadPoolExecutor(max_workers=len(pending)) as pool:
            futures = {}
            for sig, idx in pending.items():
                c = calls[idx[0]]
                program = self._programs.get(c.config)
                if program is None:
                    program = self._programs[c.config] = _build(c.config[0], self.sampler, *c.config[1:])
                options = xla_options.compiler_options(c.config[4] or jax.devices()[:1])
                futures[sig] = pool.submit(compile_one, program.lower(c.key, c.operands), idx, options)
            for sig, f in futures.items():
                self._compiled[sig] = f.result()
        logger.debug("compiled %d ensemble programs in %.1f s", len(pending), time.perf_counter() - t0)
        return seconds

    def run(self, call: "EnsembleCall") -> jax.Array:
        """Run a prepared call; its program must be compiled (:meth:`compile_many`)."""
        compiled = self._compiled.get((call.config, call.signature))
        if compiled is None:
            raise RuntimeError("this call's program is not compiled: call compile_many([call]) first")
        return compiled(call.key, call.operands)


@dataclasses.dataclass(frozen=True, eq=False)
class EnsembleCall:
    """One bound ensemble call (:meth:`EnsembleSampler.prepare`): its configuration key,
    the shapes/dtypes/pytree structure of its arguments, and the arguments."""

    config: tuple
    signature: tuple
    key: jax.Array
    operands: tuple


@_takes_request
def sample_ensemble(request: EnsembleRequest, *, sampler: Callable[..., Any] | None = None) -> jax.Array:
    """One ensemble with a fresh :class:`EnsembleSampler` (arguments: the fields of
    :class:`EnsembleRequest`, and the ``sampler``).

    Compiles on every call: for a series of calls keep one ``EnsembleSampler``.
    """
    return EnsembleSampler(sampler)(request)


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
