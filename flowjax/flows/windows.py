"""PeRFlow's window arithmetic in flowjax time (docs/methods.md, PeRFlow): K equal windows of [0, 1],
the discrete training times and their windows, the split of a sampler's steps over the windows, and
the straight line of a window read from an eps prediction.

    window w        [w / K, (w + 1) / K), half-open: it holds its noise-side start
    training time   t = k / D, k in {0, ..., D - 1}; its window w = floor(k K / D) (integers: exact)
    line            z_t = z_s + (z_e - z_s) (t - s) / (e - s) between the window's ends z_s, z_e
    eps form        z_e = lam z_s + eta eps: an eps prediction fixes the line through (lam, eta)

The parameterisations of the student's prediction on window [s, e] (`coefficients`):

    velocity   the network gives the line's velocity (z_e - z_s) / (e - s) itself
    ddim_eps   lam = a_e / a_s, eta = s_e - a_e s_s / a_s: one DDIM jump s -> e from z_s with eps
    diff_eps   g = a_s / a_e, lam = 1 / g, eta = -sqrt(1 - g^2) / g: z_s = g z_e + sqrt(1 - g^2) eps

with (a, s) = process.coefficients at s and at e. An eps prediction at (x, t) of window [s, e] is the
velocity ((lam - 1) x + eta eps) / (lam (t - s) + (e - t)) (`line_velocity`), the line's velocity
whenever eps is the window's target (`eps_target`); its denominator stays > 0 on [s, e].
Functions take scalars or per-example (B,) arrays and are traceable, except the host-side
`split_steps` and `bounds`.
"""

import jax
import jax.numpy as jnp
import numpy as np

from flowjax.flows import paths

PARAMETERIZATIONS = ('velocity', 'ddim_eps', 'diff_eps')
EPS_PARAMETERIZATIONS = ('ddim_eps', 'diff_eps')


def _table(n: int) -> jax.Array:
    """i / n for i = 0..n, each rounded once to float32 (a division on the device may be compiled
    as a multiplication by 1 / n, one rounding off)."""
    return jnp.asarray((np.arange(n + 1, dtype=np.float64) / n).astype(np.float32))


def grid_time(k: jax.Array, points: int) -> jax.Array:
    """t = k / D (float32) of integer grid indices k in {0, ..., D - 1}."""
    return _table(points)[k]


def window_of(k: jax.Array, windows: int, points: int) -> jax.Array:
    """The window w = floor(k K / D) (int32) of grid time k / D: integer arithmetic, so a time on a
    window's start (k K divisible by D) belongs to that window exactly."""
    return (jnp.asarray(k, jnp.int32) * windows) // points


def window_bounds(w: jax.Array, windows: int) -> tuple[jax.Array, jax.Array]:
    """(s, e) = (w / K, (w + 1) / K) of window indices w, float32 as in `bounds`."""
    table = _table(windows)
    return table[w], table[w + 1]


def bounds(windows: int) -> list[tuple[float, float]]:
    """[(s, e)] of the K windows as Python floats holding the float32 values w / K, noise to data."""
    table = (np.arange(windows + 1, dtype=np.float64) / windows).astype(np.float32)
    return [(float(table[w]), float(table[w + 1])) for w in range(windows)]


def split_steps(steps: int, windows: int) -> tuple[int, ...]:
    """The steps of each window when N = `steps` are spread over K windows: N is raised to K if smaller,
    every window gets N // K and the first (noise-side) N mod K windows one more."""
    steps = max(steps, windows)
    base, extra = divmod(steps, windows)
    return tuple(base + (w < extra) for w in range(windows))


def coefficients(parameterization: str, process, s: jax.Array, e: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(lam, eta) of window [s, e] for an eps parameterisation, z_e = lam z_s + eta eps (module docstring)."""
    a_s, s_s = process.coefficients(s)
    a_e, s_e = process.coefficients(e)
    if parameterization == 'ddim_eps':
        lam = a_e / a_s
        return lam, s_e - lam * s_s
    if parameterization == 'diff_eps':
        g = a_s / a_e
        return 1.0 / g, -jnp.sqrt(jnp.maximum(1.0 - g * g, 0.0)) / g
    raise ValueError(f'parameterization={parameterization!r}: expected one of {", ".join(EPS_PARAMETERIZATIONS)}')


def _per_example(a: jax.Array, x: jax.Array) -> jax.Array:
    a = jnp.asarray(a, jnp.float32)
    return a if a.ndim == 0 else paths.broadcast_time(a, x)


def line_velocity(z_s: jax.Array, z_e: jax.Array, s: jax.Array, e: jax.Array) -> jax.Array:
    """(z_e - z_s) / (e - s): the velocity of the window's straight line (the velocity target)."""
    return (z_e - z_s) / _per_example(e - s, z_s)


def line_point(z_s: jax.Array, z_e: jax.Array, s: jax.Array, e: jax.Array, t: jax.Array) -> jax.Array:
    """z_t = z_s + (z_e - z_s) (t - s) / (e - s)."""
    return z_s + (z_e - z_s) * _per_example((t - s) / (e - s), z_s)


def eps_target(z_s: jax.Array, z_e: jax.Array, lam: jax.Array, eta: jax.Array) -> jax.Array:
    """eps* = (z_e - lam z_s) / eta: the eps that puts z_e on the line from z_s (every t of the window)."""
    return (z_e - _per_example(lam, z_s) * z_s) / _per_example(eta, z_s)


def eps_velocity(x: jax.Array, eps: jax.Array, t: jax.Array, s: jax.Array, e: jax.Array, lam: jax.Array,
                 eta: jax.Array) -> jax.Array:
    """The velocity of an eps prediction at (x, t) in window [s, e]:
    ((lam - 1) x + eta eps) / (lam (t - s) + (e - t)), finite at t = e."""
    lam_x, eta_x = _per_example(lam, x), _per_example(eta, x)
    denominator = _per_example(lam * (t - s) + (e - t), x)
    return (((lam_x - 1.0) * x + eta_x * eps) / denominator).astype(x.dtype)
