"""Per-example distances between a prediction and its target, averaged to a scalar loss."""

import jax
import jax.numpy as jnp


def per_example_l2(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over all non-batch dimensions of the squared error: shape (B,)."""
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return jnp.mean(err.reshape(err.shape[0], -1), axis=1)


def l2(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Squared error, mean over dimensions and batch (the rectified-flow loss)."""
    return jnp.mean(per_example_l2(pred, target))


def per_example_pseudo_huber(pred: jax.Array, target: jax.Array, c: float | None = None) -> jax.Array:
    """rfpp's pseudo-Huber distance (sqrt(||pred - target||^2 + c^2) - c) / d, shape (B,).

    d is the number of dimensions of one example; c defaults to 0.00054 * d (docs/methods.md, rfpp;
    the iCT paper's 0.00054 * sqrt(d) is one `c=` away).
    """
    err = (pred.astype(jnp.float32) - target.astype(jnp.float32)).reshape(pred.shape[0], -1)
    d = err.shape[1]
    c = 0.00054 * d if c is None else c
    return (jnp.sqrt(jnp.sum(jnp.square(err), axis=1) + c * c) - c) / d


NORMALIZED_FLOOR = 1e-12


def normalized(per_example: jax.Array) -> jax.Array:
    """Simple ReFlow's per-sample normalisation L_i / stopgrad(L_i), shape (B,).

    The value is 1 and the gradient grad L_i / L_i: each example's loss gets the weight
    1 / stopgrad(L_i). The divisor is max(stopgrad(L_i), 1e-12), so an example with L_i < 1e-12
    (e.g. exactly 0) gives L_i / 1e-12 (0 for L_i = 0) instead of 0 / 0.
    docs/methods.md, Simple ReFlow.
    """
    return per_example / jnp.maximum(jax.lax.stop_gradient(per_example), NORMALIZED_FLOOR)


PER_EXAMPLE = {
    'l2': lambda pred, target, c=None: per_example_l2(pred, target),
    'pseudo_huber': per_example_pseudo_huber,
}
