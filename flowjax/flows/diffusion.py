"""Noising processes in flowjax time: the forward marginal x_t = alpha(t) x1 + sigma(t) eps of a
teacher, and the DDIM update of an eps prediction (docs/methods.md, Diffusion teacher (ddpm)).

    Linear  alpha = t, sigma = 1 - t: rectified flow's path (eps is the noise x0)
    VP      alpha = sqrt(abar), sigma = sqrt(1 - abar) of a discrete DDPM schedule of T steps,
            read in flowjax time t = 1 - k / T: t = 0 is the last step k = T (noise), t = 1 is k = 0
            (abar = 1, data)

VP's abar between the integer steps: for k in [1, T], log abar is linear in k between the steps'
values (exact at every step DDPM trains on); for k in [0, 1], where DDPM never trains, 1 - abar is
c k^2 with c = 1 - abar_1, so sigma = sqrt(c) k is linear there and the probability-flow velocity
stays finite at t = 1 (with 1 - abar linear in k it would grow as 1 / sqrt(1 - t)).

With an eps prediction `eps` at (x, t), x1_hat = (x - sigma(t) eps) / alpha(t), and
    DDIM jump to t'      x' = alpha(t') x1_hat + sigma(t') eps
    velocity             dx/dt = alpha'(t) x1_hat + sigma'(t) eps
the probability-flow ODE of which DDIM (eta = 0) is the first-order exponential integrator.
All functions take t as a scalar or per-example (B,) float32 array and are traceable.
"""

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from flowjax.flows import paths

SCHEDULES = ('linear', 'cosine')
LINEAR_BETAS = (1e-4, 0.02)  # Ho et al.: betas linear from 1e-4 to 0.02 over the T steps
COSINE_S = 0.008  # Nichol & Dhariwal's offset
MAX_BETA = 0.999  # Nichol & Dhariwal clip every beta of the cosine schedule to this


def betas(schedule: str, timesteps: int) -> np.ndarray:
    """The T betas (float64) of step k = 1..T of a DDPM schedule."""
    if schedule == 'linear':
        return np.linspace(*LINEAR_BETAS, timesteps, dtype=np.float64)
    if schedule == 'cosine':
        f = np.cos((np.arange(timesteps + 1, dtype=np.float64) / timesteps + COSINE_S) / (1 + COSINE_S)
                   * math.pi / 2) ** 2
        return np.minimum(1.0 - f[1:] / f[:-1], MAX_BETA)
    raise ValueError(f"unknown noise schedule {schedule!r} (expected one of {', '.join(SCHEDULES)})")


@dataclasses.dataclass(frozen=True)
class Linear:
    """Rectified flow's path as a process: alpha = t, sigma = 1 - t."""

    name: ClassVar[str] = 'linear'

    def coefficients(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(alpha(t), sigma(t))."""
        t = jnp.asarray(t, jnp.float32)
        return t, 1.0 - t

    def derivatives(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(alpha'(t), sigma'(t))."""
        t = jnp.asarray(t, jnp.float32)
        return jnp.ones_like(t), -jnp.ones_like(t)

    def marginal(self, x1: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
        """x_t = alpha(t) x1 + sigma(t) eps."""
        return _marginal(self, x1, eps, t)

    def meta(self) -> dict:
        return {'name': self.name}


@dataclasses.dataclass(frozen=True)
class VP:
    """The variance-preserving process of a DDPM schedule ('linear' or 'cosine') of `timesteps` steps."""

    schedule: str = 'linear'
    timesteps: int = 1000
    name: ClassVar[str] = 'vp'

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {self.schedule!r} (expected one of {', '.join(SCHEDULES)})")
        if isinstance(self.timesteps, bool) or not isinstance(self.timesteps, int) or self.timesteps < 2:
            raise ValueError(f'timesteps={self.timesteps!r}: must be an integer >= 2')

    @functools.cached_property
    def log_abar(self) -> np.ndarray:
        """log abar_k for k = 0..T (float64; abar_0 = 1)."""
        return np.concatenate([[0.0], np.cumsum(np.log1p(-betas(self.schedule, self.timesteps)))])

    def steps(self, t: jax.Array) -> jax.Array:
        """The continuous diffusion step k = (1 - t) T of flowjax time t, clipped to [0, T]."""
        return jnp.clip((1.0 - jnp.asarray(t, jnp.float32)) * self.timesteps, 0.0, float(self.timesteps))

    def _pieces(self, t: jax.Array):
        """(abar, 1 - abar, d abar / dk, d sigma / dk) at t (see the module docstring)."""
        k = self.steps(t)
        table = jnp.asarray(self.log_abar, jnp.float32)
        c = float(-np.expm1(self.log_abar[1]))  # 1 - abar_1
        j = jnp.clip(jnp.floor(k), 1, self.timesteps - 1).astype(jnp.int32)
        slope = table[j + 1] - table[j]
        log_abar = table[j] + (k - j) * slope
        low = k < 1.0
        abar = jnp.where(low, 1.0 - c * k * k, jnp.exp(log_abar))
        rest = jnp.where(low, c * k * k, -jnp.expm1(log_abar))
        dabar = jnp.where(low, -2.0 * c * k, jnp.exp(log_abar) * slope)
        sigma = jnp.sqrt(rest)
        dsigma = jnp.where(low, math.sqrt(c), -dabar / (2.0 * jnp.where(low, 1.0, sigma)))
        return abar, rest, dabar, dsigma

    def abar(self, t: jax.Array) -> jax.Array:
        """abar(t): 1 at t = 1, abar_T at t = 0."""
        return self._pieces(t)[0]

    def coefficients(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(alpha(t), sigma(t)) = (sqrt(abar), sqrt(1 - abar)), 1 - abar computed without cancellation."""
        abar, rest, _, _ = self._pieces(t)
        return jnp.sqrt(abar), jnp.sqrt(rest)

    def derivatives(self, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(alpha'(t), sigma'(t)), d/dt = -T d/dk."""
        abar, _, dabar, dsigma = self._pieces(t)
        scale = -float(self.timesteps)
        return scale * dabar / (2.0 * jnp.sqrt(abar)), scale * dsigma

    def marginal(self, x1: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
        """x_t = alpha(t) x1 + sigma(t) eps: DDPM's forward process."""
        return _marginal(self, x1, eps, t)

    def meta(self) -> dict:
        return {'name': self.name, 'schedule': self.schedule, 'timesteps': self.timesteps}


Process = Linear | VP


def from_meta(meta: dict) -> Process:
    """The process an export's meta records ({'name': 'linear'} or {'name': 'vp', 'schedule', 'timesteps'})."""
    if meta.get('name') == Linear.name:
        return Linear()
    if meta.get('name') == VP.name:
        return VP(meta['schedule'], int(meta['timesteps']))
    raise ValueError(f"unknown noising process {meta.get('name')!r} (expected {Linear.name} or {VP.name})")


def _marginal(process: Process, x1: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    alpha, sigma = process.coefficients(t)
    return paths.broadcast_time(alpha, x1) * x1 + paths.broadcast_time(sigma, x1) * eps


def _per_example(a: jax.Array, x: jax.Array) -> jax.Array:
    a = jnp.asarray(a, jnp.float32)
    return a if a.ndim == 0 else paths.broadcast_time(a, x)


def data_estimate(process: Process, x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """x1_hat = (x - sigma(t) eps) / alpha(t): the data an eps prediction at (x, t) implies."""
    alpha, sigma = process.coefficients(t)
    return (x - _per_example(sigma, x) * eps) / _per_example(alpha, x)


def ddim_step(process: Process, x: jax.Array, eps: jax.Array, t: jax.Array, t_next: jax.Array) -> jax.Array:
    """DDIM (eta = 0) from t to t_next (either direction): alpha(t') x1_hat + sigma(t') eps."""
    x1_hat = data_estimate(process, x, eps, t)
    alpha, sigma = process.coefficients(t_next)
    return (_per_example(alpha, x) * x1_hat + _per_example(sigma, x) * eps).astype(x.dtype)


def eps_velocity(process: Process, x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
    """The probability-flow velocity alpha'(t) x1_hat + sigma'(t) eps of an eps prediction at (x, t)."""
    x1_hat = data_estimate(process, x, eps, t)
    d_alpha, d_sigma = process.derivatives(t)
    return (_per_example(d_alpha, x) * x1_hat + _per_example(d_sigma, x) * eps).astype(x.dtype)
