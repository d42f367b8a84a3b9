"""Time embeddings shared by the velocity networks."""

import math

import jax
import jax.numpy as jnp


def sinusoidal(t: jax.Array, dim: int, *, scale: float = 1000.0, max_period: float = 10000.0) -> jax.Array:
    """Transformer-style embedding of times t (B,) in [0, 1], rescaled by `scale`: (B, dim)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (scale * t.astype(jnp.float32))[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb
