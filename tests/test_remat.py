"""Per-block rematerialisation of the U-Net (``remat=True``, what ``--remat`` turns on).

A VJP through the fixture network with and without it: the same D and the same
gradients (with respect to x and to every parameter) to float32 round-off, and XLA's
compiled temp memory of the VJP program must drop by at least 30 % (measured: see
``benchmarks/remat_memory.py``; whole-network ``jax.checkpoint``, the former
``--remat``, changed nothing here).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_errors


@pytest.fixture(scope="module")
def den(fixtures_dir):
    return np.load(fixtures_dir / "tiny_denoiser.npz")


@pytest.mark.slow  # > 20 s on 2 cores: in the `-m slow` set that CI also runs (README, Tests)
def test_remat_same_vjp_and_less_memory(tiny_model, den):
    params = tiny_model.params
    x = jnp.asarray(den["x"][1:2])
    cond = dict(
        class_labels=den["class_labels"][1:2],
        condition=den["condition"][1:2],
        second_of_day=den["second_of_day"][1:2],
        day_of_year=den["day_of_year"][1:2],
    )
    w = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), jnp.float32)

    def program(remat):
        def f(params, x, w):
            D, vjp = jax.vjp(lambda p, z: tiny_model.apply(p, z, jnp.float32(1.5), remat=remat, **cond), params, x)
            gp, gx = vjp(w)
            return D, gx, gp

        return jax.jit(f).lower(params, x, w).compile()

    compiled = {r: program(r) for r in (False, True)}
    temp = {r: compiled[r].memory_analysis().temp_size_in_bytes for r in compiled}
    (D0, gx0, gp0), (D1, gx1, gp1) = (compiled[r](params, x, w) for r in (False, True))
    # float32 round-off: the rematerialised blocks' forward is a separate computation that
    # XLA fuses apart from the scanned plain one (measured 4.7e-6; 0 before blocks were
    # scanned, 2.4e-6 scanned vs unrolled); a wrong block or parameter gives O(1)
    assert rel_errors(D1, D0)[0] <= 1e-5
    # same reason: measured 2.4e-5 max-abs at a few pixels, 1.2e-6 RMS (1e-5 and 0 before
    # blocks were scanned); bounded as the network's PyTorch parity (1e-4 max) plus RMS
    maxabs, rms = rel_errors(gx1, gx0)
    assert maxabs <= 1e-4 and rms <= 1e-5, (maxabs, rms)
    leaves0, leaves1 = jax.tree_util.tree_leaves(gp0), jax.tree_util.tree_leaves(gp1)
    assert len(leaves0) == len(leaves1) > 100
    # parameter gradients, relative RMS per leaf: float32 round-off of two fusions of the same
    # maths. Measured 3.9e-5 at the 8x8 encoder blocks (attention, few pixels to average
    # over); the plain network scanned vs unrolled differs by 5.1e-5 at the same leaves, so
    # this is the round-off of any regrouping, not remat (0 before blocks were scanned, when
    # the two programs fused alike). A wrong block or parameter gives O(1).
    worst = max(rel_errors(a, b)[1] for a, b in zip(leaves1, leaves0) if np.any(np.asarray(b)))
    assert worst <= 1e-4, worst
    assert temp[True] <= 0.7 * temp[False], temp

