"""Distributions of the training time t (t = 0 noise, t = 1 data)."""

import jax
import jax.numpy as jnp


def uniform(rng: jax.Array, n: int, *, eps: float = 1e-3) -> jax.Array:
    """t ~ U[eps, 1], the rectified-flow default (eps keeps t away from pure noise)."""
    return jax.random.uniform(rng, (n,), jnp.float32, minval=eps, maxval=1.0)
