"""Velocity MLP for low-dimensional (toy 2D) flows."""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flowjax.models import embeddings


class VelocityMLP(nn.Module):
    """v(x, t): x (B, D) and t (B,) -> (B, D). Time enters every hidden layer."""

    features: Sequence[int] = (256, 256, 256)
    time_dim: int = 64
    dropout: float = 0.0
    out_channels: int | None = None  # output width; None: x's (CAF's networks read 2D, give D)

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, *, train: bool = False) -> jax.Array:
        temb = embeddings.sinusoidal(t, self.time_dim)
        temb = nn.silu(nn.Dense(self.time_dim * 2, name='time_in')(temb))
        h = x
        for i, width in enumerate(self.features):
            h = nn.Dense(width, name=f'dense_{i}')(h) + nn.Dense(width, name=f'time_{i}')(temb)
            h = nn.silu(h)
            if self.dropout > 0:
                h = nn.Dropout(self.dropout, deterministic=not train)(h)
        out = nn.Dense(self.out_channels or x.shape[-1], name='out', kernel_init=nn.initializers.zeros)(h)
        return out.astype(jnp.float32)
