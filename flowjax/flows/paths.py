"""Interpolants between noise x0 (t = 0) and data x1 (t = 1) and their velocity targets."""

import jax
import jax.numpy as jnp


def broadcast_time(t: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes per-example times (B,) so they broadcast against x (B, ...)."""
    return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))


def linear(x0: jax.Array, x1: jax.Array, t: jax.Array) -> jax.Array:
    """The rectified-flow path x_t = (1 - t) x0 + t x1."""
    t = broadcast_time(t, x0)
    return (1.0 - t) * x0 + t * x1


def linear_velocity(x0: jax.Array, x1: jax.Array) -> jax.Array:
    """d/dt of the linear path: the constant velocity x1 - x0."""
    return x1 - x0


def constant_acceleration(x0: jax.Array, x1: jax.Array, v0: jax.Array, t: jax.Array) -> jax.Array:
    """CAF's path x_t = (1 - t^2) x0 + t^2 x1 + v0 (t - t^2): it starts at x0 with velocity v0 and
    reaches x1 at t = 1 under the constant acceleration 2 (x1 - x0 - v0) (docs/methods.md, CAF)."""
    t = broadcast_time(t, x0)
    return (1.0 - t * t) * x0 + t * t * x1 + v0 * (t - t * t)
