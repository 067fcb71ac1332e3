"""Fixed-iteration Krylov solvers for the guidance linear systems (MMPS's
``(Sigma_y + sigma^2 A' J A'^T) v = r``): conjugate gradients and GMRES, matrix-free,
with a fixed iteration count so that each is one program and reverse-differentiable.

``matvec``: ``w -> M w`` on (n,) vectors; ``b``: (n,). Returns the iterate (n,).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cg(matvec, b, iters, unroll=True):
    """``iters`` conjugate-gradient iterations from 0 (fixed count: one program, and
    reverse-differentiable).

    ``unroll=True`` traces the iterations one after another instead of as a loop: on
    XLA:CPU the loop made the VJPs inside it ~3x slower (benchmarks/README.md).

    Once the residual is at round-off (``|r|^2 <= eps^2 |b|^2``) the iterate is frozen:
    continuing would divide by ``p^T A p ~ |r|^2`` -> 0, which the forward pass survives
    but whose derivative (``rs / pap^2``) overflows to inf/NaN in the reverse pass (seen
    when sigma_y^2 dominates the system, e.g. at small sigma, where CG converges in 1-2
    iterations)."""
    rs0 = jnp.vdot(b, b)
    tol = jnp.finfo(b.dtype).eps ** 2 * rs0

    def body(_, st):
        x, r, p, rs = st
        active = rs > tol
        ap = matvec(p)
        pap = jnp.vdot(p, ap)
        ok = active & (pap > 0)
        alpha = jnp.where(ok, rs / jnp.where(ok, pap, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = jnp.where(ok, jnp.vdot(r, r), rs)
        beta = jnp.where(ok, rs_new / jnp.where(ok, rs, 1.0), 0.0)
        return x, r, r + beta * p, rs_new

    state = (jnp.zeros_like(b), b, b, rs0)
    if not unroll:
        return jax.lax.fori_loop(0, iters, body, state)[0]
    # a Python loop, not fori_loop(unroll=True): that one keeps a while loop when
    # iters == 1 (measured 4.1x instead of 2.8x an unguided call at k = 1)
    for i in range(iters):
        state = body(i, state)
    return state[0]


def gmres(matvec, b, iters):
    """``iters`` GMRES iterations from 0, no restart (Arnoldi with modified Gram-Schmidt,
    unrolled; the small least-squares problem solved by ``lstsq``)."""
    beta = jnp.linalg.norm(b)
    tiny = jnp.finfo(b.dtype).tiny
    vs = [b / jnp.maximum(beta, tiny)]
    h = jnp.zeros((iters + 1, iters), b.dtype)
    for j in range(iters):
        w = matvec(vs[j])
        for i in range(j + 1):
            hij = jnp.vdot(vs[i], w)
            h = h.at[i, j].set(hij)
            w = w - hij * vs[i]
        hn = jnp.linalg.norm(w)
        h = h.at[j + 1, j].set(hn)
        vs.append(w / jnp.maximum(hn, tiny))
    e1 = jnp.zeros(iters + 1, b.dtype).at[0].set(beta)
    c = jnp.linalg.lstsq(h, e1)[0]
    return jnp.stack(vs[:iters], axis=1) @ c
