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
