"""Straightness of a flow's Euler paths: how far the velocity strays from the path's chord."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flowjax.flows import solvers

Velocity = Callable[[jax.Array, jax.Array], jax.Array]


def squared_deviations(xs: np.ndarray, vs: np.ndarray, duration: float) -> np.ndarray:
    """||chord - v||^2 (S, B) in float64 per step and path of Euler paths xs (S+1, B, ...) with step velocities
    vs (S, B, ...); each path's values depend on that path only.

    The chord (z1 - z0) is divided by the path's duration so that it is the mean
    velocity; on [0, 1] this is exactly z1 - z0.
    """
    xs = np.asarray(xs, np.float64)
    vs = np.asarray(vs, np.float64)
    chord = (xs[-1] - xs[0]) / duration
    diff = (chord[None] - vs).reshape(vs.shape[0], vs.shape[1], -1)
    return np.sum(diff * diff, axis=-1)


def summary(sq: np.ndarray) -> dict[str, float]:
    """{'straightness', 'straightness_norm'}: the means of squared deviations sq (S, B) and of their roots."""
    return {'straightness': float(sq.mean()), 'straightness_norm': float(np.sqrt(sq).mean())}


def path_straightness(xs: np.ndarray, vs: np.ndarray, duration: float) -> dict[str, float]:
    """Straightness of Euler paths xs (S+1, B, ...) with step velocities vs (S, B, ...)."""
    return summary(squared_deviations(xs, vs, duration))


def straightness(velocity: Velocity, x0: np.ndarray, *, steps: int = 100,
                 eps: float = 1e-3) -> dict[str, float]:
    """Mean over an Euler grid on [eps, 1] of ||(z1 - z0) - v_t||^2 and of its norm."""
    path = jax.jit(functools.partial(solvers.trajectory, velocity, steps=steps, t0=eps, t1=1.0))
    xs, vs = path(jnp.asarray(x0, jnp.float32))
    return path_straightness(xs, vs, 1.0 - eps)

