"""The network's 3x3 convolution (jaxguide.model.layers.conv3x3_valid) and its written-out input gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxguide.model.layers import conv3x3_valid


def _plain(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _data(dtype=jnp.float32, n=5, cin=3, cout=4):
    rng = np.random.default_rng(0)
    shapes = ((2, n + 2, n + 2, cin), (3, 3, cin, cout), (2, n, n, cout))
    return tuple(jnp.asarray(rng.normal(size=s), dtype) for s in shapes)


def test_values_and_vjp_equal_autodiff_of_the_plain_convolution():
    with jax.enable_x64(True):
        x, w, g = _data(jnp.float64)
        y, vjp = jax.vjp(conv3x3_valid, x, w)
        y_ref, vjp_ref = jax.vjp(_plain, x, w)
        np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
        for got, ref in zip(vjp(g), vjp_ref(g)):
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_input_gradient_against_finite_differences():
    with jax.enable_x64(True):
        x, w, g = _data(jnp.float64)
        loss = lambda z: jnp.sum(conv3x3_valid(z, w) * g)  # noqa: E731
        grad = jax.grad(loss)(x)
        rng = np.random.default_rng(1)
        for _ in range(4):
            d = jnp.asarray(rng.normal(size=x.shape))
            h = 1e-5
            fd = (loss(x + h * d) - loss(x - h * d)) / (2 * h)
            np.testing.assert_allclose(float(jnp.sum(grad * d)), float(fd), rtol=1e-8)


def test_input_gradient_is_canonical_inside_a_loop():
    """Inside a loop body XLA:CPU does not canonicalise convolutions: JAX's own transposed
    convolution (kernel labelled 01oi) then ran through a slow generic emitter. The
    written-out gradient keeps every convolution of a scanned VJP in the (3, 3, in, out)
    form (01io)."""
    x, w, g = _data()

    def run(conv):
        def program(x, w, g):  # the kernel is an argument, as the network's parameters are
            def body(c, _):
                y, vjp = jax.vjp(lambda z: conv(z, w), x + c)
                return c + jnp.mean(vjp(g)[0]) + jnp.mean(y), None

            return jax.lax.scan(body, 0.0, None, length=2)[0]

        return jax.jit(program).lower(x, w, g).compile().as_text()

    labels = lambda text: {line.split("dim_labels=")[1].split(",")[0] for line in text.splitlines()  # noqa: E731
                           if "convolution(" in line}
    assert labels(run(conv3x3_valid)) == {"b01f_01io->b01f"}
    if jax.default_backend() == "cpu":
        assert "b01f_01oi->b01f" in labels(run(_plain))  # the form the custom gradient avoids (so the test can fail)
