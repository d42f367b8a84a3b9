"""ODE solvers for rectified flows: fixed-step Euler/Heun/midpoint, FireFlow,
RF-Solver, CAF's constant-acceleration update, DDIM, and rk45.

Convention: t = 0 is noise, t = 1 is data. A velocity is a callable
`v(x, t)` with x of shape (B, ...) and t of shape (B,) float32. Sampling
integrates from t = eps to 1; inversion from t = 1 to eps.

Everything here is traceable under `jax.jit` and works on sharded global
arrays: step loops are `lax.scan` / diffrax while loops, never Python loops.

Solver objects
--------------
A solver is a frozen, hashable dataclass (it keys jit caches) with
  * `key`: a short label, e.g. 'euler@8', 'heun@4:edm', 'fireflow@4:shift=1',
    'rk45';
  * `solve(velocity, x, t0, t1) -> (x_end, nfe)`: integrates dx/dt = v(x, t)
    from t0 to t1 (forward when t1 > t0, inverse when t1 < t0). t0 and t1 are
    Python floats (or 0-d arrays), or per-example (B,) arrays: example i then
    integrates its own window [t0_i, t1_i]. `nfe` is an int32 scalar counting
    velocity calls.
Fixed-step solvers (`FixedStepSolver` subclasses: `Euler`, `Heun`,
`Midpoint`, `FireFlow`, `RFSolver`, `ConstantAcceleration`, `DDIM`) take
`steps` and a time `grid`, and add
  * `nfe_per_step` and `init_nfe` (calls made by `init`), so that
    nfe = init_nfe + nfe_per_step * steps;
  * `init(velocity, x, t) -> state`: per-call state at the start time t;
  * `step(velocity, x, t, dt, state) -> (x, state)`: one step from time t
    with signed step dt, both per-example (B,) float32 arrays or scalars.
`FixedStepSolver.solve` builds the grid t_0..t_N and scans
(x, state) <- step(velocity, x, t_k, t_{k+1} - t_k, state), starting from
state = init(velocity, x, t_0). Euler, Heun, midpoint and RF-Solver keep no
state (None). A solver with a cache is a `FixedStepSolver` subclass whose
`init` evaluates and returns the first velocity and whose `step` uses the
cached one and returns the next; an entry in `FIXED_STEP` makes a solver
reachable from specs. `FireFlow` ('fireflow@N', Deng et al. 2024) is one:
with k the cached velocity (k = v(x, t_0) from `init`), a step t -> t + h is
    x_m = x + h/2 k,  k' = v(x_m, t + h/2),  x' = x + h k',
and k' is cached for the next step: init_nfe = 1, nfe_per_step = 1, so
NFE = N + 1 per solve (sampling or inversion), against 2N for midpoint.
`RFSolver` ('rf_solver@N') is RF-Solver's second-order Taylor step as its
public code writes it: v = v(x, t), x_m = x + h/2 v, v_m = v(x_m, t + h/2),
x' = x + h v + h^2/2 (v_m - v) / (h/2), which is midpoint up to rounding
(2N NFE).
`ConstantAcceleration` ('caf@N') steps the field of a constant-acceleration
model (`Accelerated`: dx/dt = v0 + t a(x, t), docs/methods.md, CAF) exactly
while a is constant over a step; the other solvers integrate that field as
any velocity. `DDIM` ('ddim@N') steps the field of an eps-prediction
diffusion model (`EpsField`: its probability-flow velocity, docs/methods.md,
Diffusion teacher (ddpm)) by the DDIM (eta = 0) jump; the other solvers
integrate that probability-flow ODE. Either refuses any other field. `RK45`
is adaptive Dopri5. `Sampler` is the spec object that callers hold
(`parse_sampler` makes it): it names a solver and delegates to it.

Per-example times
-----------------
Fixed-step: example i follows the grid of its own window; on the uniform
grid t_ik = t0_i + (t1_i - t0_i) k / N (the last time exactly t1_i). With
float endpoints the grid is `jnp.linspace(t0, t1, N + 1)` in float32.
rk45 with array endpoints integrates the normalised time s in [0, 1]:
dx/ds = (t1 - t0) v(x, t0 + s (t1 - t0)), one diffrax solve over the batch.

Specs and time grids
--------------------
A spec is `name@N[:grid]` for fixed-step solvers ('euler@8', 'heun@5:edm',
'euler@4:edm=3', 'rf_solver@4', 'fireflow@4:shift=1.15') and `rk45` (alias
`dopri5`) for the adaptive one, which takes no grid. The grid is `uniform`
(the default), the shifted grid `shift=MU` (below) or the EDM schedule `edm`
(rho = 7) / `edm=RHO`:
with sigma(t) = (1 - t) / t (so t = 1 / (1 + sigma)), on the window [a, b]
(a < b), sigma_max = sigma(a), sigma_min = sigma(b) and
    sigma_k = (sigma_max^(1/rho) + k/N (sigma_min^(1/rho)
               - sigma_max^(1/rho)))^rho,  t_k = 1 / (1 + sigma_k),
k = 0..N, with t_0 = a and t_N = b exactly. In t the steps are short at
both ends and long in the middle. An inverse solve (t0 > t1) walks the same
grid backwards. The EDM grid needs t > 0 at its noise end (sigma(0) is
infinite): float endpoints of 0 raise, traced ones give NaNs.
The shifted grid `shift=MU` (FLUX's time shift, any finite MU) moves the
uniform grid's noise levels nu_k = 1 - k/N (nu = 1 at the noise end a) to
    nu'_k = e^MU nu_k / (e^MU nu_k + 1 - nu_k),  t_k = a + (b - a) (1 - nu'_k),
i.e. t_k = a + (b - a) u / (u + e^MU (1 - u)) with u = k/N, so t_0 = a and
t_N = b exactly. The step in u is e^-MU times the uniform one at the noise
end and e^MU times it at the data end: MU > 0 puts the short steps at the
noise end (a) and the long ones at the data end (b), MU < 0 the reverse, and
MU = 0 is the uniform grid. It is finite at t = 0, and an inverse solve walks
it backwards.

rk45 NFE
--------
rk45 NFE is exactly `6 * num_steps + 1` (num_steps = accepted + rejected):
one call for the FSAL first stage, then six new stages per attempted step.
Two diffrax 0.7.2 details make this exact:
  * dt0=None does not run Hairer's initial-step rule: diffeqsolve wraps the
    term in a WrapTerm, which `_select_initial_step` does not recognise as an
    ODETerm, so it returns a fixed |dt0| = 0.01 with no velocity calls.
  * Stock Dopri5 re-evaluates the first stage on every attempt until one is
    accepted (7 calls each); `_Dopri5` computes it once in `init` instead,
    which gives bit-identical results with fewer calls.
tests/test_solvers.py counts real calls to pin this down. A solve that hits
`max_steps` returns NaNs (no host callback, so it stays jit/sharding friendly).
"""

import dataclasses
import functools
import math
import re
from typing import Any, Callable, ClassVar

import diffrax
import jax
import jax.numpy as jnp

from flowjax.flows import diffusion

Velocity = Callable[[jax.Array, jax.Array], jax.Array]
Apply = Callable[[Any, jax.Array, jax.Array], jax.Array]
Time = float | jax.Array  # a scalar, or per-example (B,)

SOLVERS = ('euler', 'heun', 'midpoint', 'fireflow', 'rf_solver', 'caf', 'ddim',
           'rk45')
_ALIASES = {'dopri5': 'rk45'}
_GRID_SPECS = 'uniform, edm, edm=RHO, shift=MU'
_EDM_RHO = 7.0


# ----------------------------------------------------------------- checks


def _check_steps(steps: Any, where: str) -> None:
    """Raises a one-line ValueError unless steps is an integer >= 1."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f'{where}: steps must be an integer >= 1')


def _check(name: str, steps: Any, where: str) -> None:
    """Raises a one-line ValueError if (name, steps) is not a valid sampler."""
    if name not in SOLVERS:
        raise ValueError(f'{where}: unknown solver {name!r} '
                         f'(expected one of {", ".join(SOLVERS)})')
    if name == 'rk45':
        if steps is not None:
            raise ValueError(f'{where}: adaptive rk45 takes no step count')
    elif steps is None:
        raise ValueError(f"{where}: fixed-step solvers need '@N' steps")
    else:
        _check_steps(steps, where)


def _check_rho(rho: Any, where: str) -> None:
    """Raises a one-line ValueError unless rho is a finite number > 0."""
    if (isinstance(rho, bool) or not isinstance(rho, (int, float))
            or not math.isfinite(rho) or rho <= 0):
        raise ValueError(f'{where}: rho must be a number > 0')


def _check_mu(mu: Any, where: str) -> None:
    """Raises a one-line ValueError unless mu is a finite number."""
    if (isinstance(mu, bool) or not isinstance(mu, (int, float))
            or not math.isfinite(mu)):
        raise ValueError(f'{where}: mu must be a finite number')


def _number(x: float) -> str:
    """Shortest text that reads back as x: 3.0 -> '3', 2.5 -> '2.5'."""
    text = repr(float(x))
    return text[:-2] if text.endswith('.0') else text


# ------------------------------------------------------------------ times


def _is_scalar(t0: Time, t1: Time) -> bool:
    return jnp.ndim(t0) == 0 and jnp.ndim(t1) == 0


def _endpoints(t0: Time, t1: Time, x: jax.Array) -> tuple[Time, Time]:
    """Scalars pass unchanged; otherwise both become (B,) float32 arrays."""
    if _is_scalar(t0, t1):
        return t0, t1
    batch = x.shape[0]
    for t in (t0, t1):
        if jnp.shape(t) not in ((), (batch,)):
            raise ValueError(f'solve: times must be scalars or of shape '
                             f'({batch},), got shape {jnp.shape(t)}')
    as_batch = lambda t: jnp.broadcast_to(jnp.asarray(t, jnp.float32),
                                          (batch,))
    return as_batch(t0), as_batch(t1)


def _time(t: Time, x: jax.Array) -> jax.Array:
    """A scalar or (B,) time as the (B,) float32 vector velocities expect."""
    return jnp.full((x.shape[0],), t, dtype=jnp.float32)


def _per_example(a: Time, x: jax.Array) -> Time:
    """A (B,) array reshaped to broadcast against x; scalars unchanged."""
    if jnp.ndim(a) == 0:
        return a
    return jnp.reshape(a, a.shape + (1,) * (x.ndim - 1))


def _fractions(steps: int, t: Time) -> jax.Array:
    """k / N for k = 0..N, shaped (N + 1, 1...) to broadcast against t."""
    f = jnp.arange(steps + 1, dtype=jnp.float32) / steps
    return f.reshape((steps + 1,) + (1,) * jnp.ndim(t))


def _pin_ends(ts: jax.Array, t0: Time, t1: Time) -> jax.Array:
    """ts with its first time exactly t0 and its last exactly t1."""
    return ts.at[0].set(t0).at[-1].set(t1)


def _sigma(t: jax.Array) -> jax.Array:
    """EDM noise level of flowjax time t: sigma = (1 - t) / t."""
    return (1.0 - t) / t


@dataclasses.dataclass(frozen=True)
class UniformGrid:
    """Equal steps: t_k = t0 + (t1 - t0) k / N."""
    key: ClassVar[str] = 'uniform'

    def times(self, t0: Time, t1: Time, steps: int) -> jax.Array:
        """(N + 1,) times for scalar endpoints, (N + 1, B) for arrays.

        Scalars use `jnp.linspace(t0, t1, N + 1)` in float32, as always.
        """
        if _is_scalar(t0, t1):
            return jnp.linspace(t0, t1, steps + 1, dtype=jnp.float32)
        ts = t0 + (t1 - t0) * _fractions(steps, t0)
        return _pin_ends(ts, t0, t1)


@dataclasses.dataclass(frozen=True)
class EdmGrid:
    """EDM's schedule: uniform in sigma^(1/rho), sigma = (1 - t) / t."""
    rho: float = _EDM_RHO

    def __post_init__(self):
        _check_rho(self.rho, f'EdmGrid(rho={self.rho!r})')

    @property
    def key(self) -> str:
        """'edm' for rho = 7, else e.g. 'edm=3'."""
        return 'edm' if self.rho == _EDM_RHO else f'edm={_number(self.rho)}'

    def times(self, t0: Time, t1: Time, steps: int) -> jax.Array:
        """The grid from t0 to t1 (see the module docstring).

        On [a, b] = [min, max](t0, t1): sigma_k^(1/rho) runs linearly from
        sigma(a)^(1/rho) to sigma(b)^(1/rho), t_k = 1 / (1 + sigma_k),
        t_0 = a and t_N = b exactly; reversed when t1 < t0.
        """
        _check_noise_end(t0, t1)
        t0 = jnp.asarray(t0, jnp.float32)
        t1 = jnp.asarray(t1, jnp.float32)
        lo, hi = jnp.minimum(t0, t1), jnp.maximum(t0, t1)
        root_max = _sigma(lo) ** (1.0 / self.rho)
        root_min = _sigma(hi) ** (1.0 / self.rho)
        f = _fractions(steps, lo)
        sigmas = (root_max + f * (root_min - root_max)) ** self.rho
        ts = _pin_ends(jnp.clip(1.0 / (1.0 + sigmas), lo, hi), lo, hi)
        return jnp.where(t1 < t0, ts[::-1], ts)


def _check_noise_end(t0: Time, t1: Time) -> None:
    """Concrete float endpoints of the EDM grid must be > 0."""
    for t in (t0, t1):
        if isinstance(t, (int, float)) and t <= 0:
            raise ValueError(f'edm time grid: times must be > 0, got {t!r} '
                             '(sigma(0) = (1 - t) / t is infinite)')


@dataclasses.dataclass(frozen=True)
class ShiftGrid:
    """FLUX's shifted grid: noise level nu = 1 - u (u = k/N) moved to
    nu' = e^mu nu / (e^mu nu + 1 - nu); mu > 0 gives short steps at the noise
    end, mu = 0 the uniform grid."""
    mu: float

    def __post_init__(self):
        _check_mu(self.mu, f'ShiftGrid(mu={self.mu!r})')

    @property
    def key(self) -> str:
        """e.g. 'shift=1.15' ('shift=0' for mu = -0.0 too)."""
        return f'shift={_number(self.mu + 0.0)}'

    def times(self, t0: Time, t1: Time, steps: int) -> jax.Array:
        """The grid from t0 to t1 (see the module docstring).

        On [a, b] = [min, max](t0, t1): t_k = a + (b - a) (1 - nu'_k), with
        1 - nu'_k = u / (u + e^mu (1 - u)) (exactly 0 and 1 at the ends),
        t_0 = a and t_N = b exactly; reversed when t1 < t0.
        """
        t0 = jnp.asarray(t0, jnp.float32)
        t1 = jnp.asarray(t1, jnp.float32)
        lo, hi = jnp.minimum(t0, t1), jnp.maximum(t0, t1)
        u = _fractions(steps, lo)
        scale = jnp.exp(jnp.float32(self.mu))  # inf or 0 for huge |mu|: no NaN
        signal = u / (u + scale * (1.0 - u))  # 1 - nu'
        ts = _pin_ends(lo + (hi - lo) * signal, lo, hi)
        return jnp.where(t1 < t0, ts[::-1], ts)


UNIFORM = UniformGrid()
TimeGrid = UniformGrid | EdmGrid | ShiftGrid
_UNSIGNED = r'([0-9]+\.?[0-9]*|\.[0-9]+)(e[-+]?[0-9]+)?'


def _parse_grid(text: str, where: str) -> TimeGrid:
    """'uniform' / 'edm' / 'edm=RHO' / 'shift=MU' -> a time grid."""
    name, eq, value = text.partition('=')
    if not eq:
        grids = {'uniform': UNIFORM, 'edm': EdmGrid()}
        if name in grids:
            return grids[name]
    elif name == 'edm':
        rho = float(value) if re.fullmatch(_UNSIGNED, value) else None
        _check_rho(rho, f'{where}: time grid {text!r}')
        return EdmGrid(rho)
    elif name == 'shift':
        signed = f'[-+]?{_UNSIGNED}'
        mu = float(value) if re.fullmatch(signed, value) else None
        _check_mu(mu, f'{where}: time grid {text!r}')
        return ShiftGrid(mu)
    raise ValueError(f'{where}: unknown time grid {text!r} '
                     f'(expected {_GRID_SPECS})')


# ------------------------------------------------------ fixed-step solvers


@dataclasses.dataclass(frozen=True)
class FixedStepSolver:
    """Base of fixed-step solvers: `steps` steps on a time `grid`.

    Subclasses set `name`, `nfe_per_step` (and `init_nfe` if `init` calls
    the velocity) and define `step` (and `init` if they keep state).
    """
    steps: int
    grid: TimeGrid = UNIFORM
    name: ClassVar[str]
    nfe_per_step: ClassVar[int]
    init_nfe: ClassVar[int] = 0

    def __post_init__(self):
        where = f'{type(self).__name__}(steps={self.steps!r})'
        _check_steps(self.steps, where)

    @property
    def key(self) -> str:
        """'euler@8'; a non-uniform grid is appended: 'heun@4:edm'."""
        key = f'{self.name}@{self.steps}'
        return key if self.grid.key == 'uniform' else f'{key}:{self.grid.key}'

    @property
    def nfe(self) -> int:
        """Velocity calls per solve: init_nfe + nfe_per_step * steps."""
        return self.init_nfe + self.nfe_per_step * self.steps

    def init(self, velocity: Velocity, x: jax.Array, t: Time) -> Any:
        """Per-call state at the start time t; none by default."""
        return None

    def step(self, velocity: Velocity, x: jax.Array, t: Time, dt: Time,
             state: Any) -> tuple[jax.Array, Any]:
        """One step from t with signed step dt; returns (x, state)."""
        raise NotImplementedError

    def solve(self, velocity: Velocity, x: jax.Array, t0: Time,
              t1: Time) -> tuple[jax.Array, jax.Array]:
        """Scans `step` over the grid from t0 to t1; returns (x(t1), nfe)."""
        t0, t1 = _endpoints(t0, t1, x)
        ts = self.grid.times(t0, t1, self.steps)

        def body(carry, t_dt):
            y, state = carry
            return self.step(velocity, y, *t_dt, state), None

        carry = (x, self.init(velocity, x, ts[0]))
        (x1, _), _ = jax.lax.scan(body, carry, (ts[:-1], ts[1:] - ts[:-1]))
        return x1, jnp.asarray(self.nfe, jnp.int32)


def _v(velocity: Velocity, x: jax.Array, t: Time) -> jax.Array:
    """velocity(x, t) with t as the (B,) float32 vector it expects."""
    return velocity(x, _time(t, x))


@dataclasses.dataclass(frozen=True)
class Euler(FixedStepSolver):
    """x' = x + dt v(x, t)."""
    name: ClassVar[str] = 'euler'
    nfe_per_step: ClassVar[int] = 1

    def step(self, velocity, x, t, dt, state):
        dx = _per_example(dt, x) * _v(velocity, x, t)
        return (x + dx).astype(x.dtype), state


@dataclasses.dataclass(frozen=True)
class Midpoint(FixedStepSolver):
    """x' = x + dt v(x + dt/2 v(x, t), t + dt/2)."""
    name: ClassVar[str] = 'midpoint'
    nfe_per_step: ClassVar[int] = 2

    def step(self, velocity, x, t, dt, state):
        h = _per_example(dt, x)
        x_mid = x + 0.5 * h * _v(velocity, x, t)
        dx = h * _v(velocity, x_mid, t + 0.5 * dt)
        return (x + dx).astype(x.dtype), state


@dataclasses.dataclass(frozen=True)
class RFSolver(FixedStepSolver):
    """RF-Solver's second-order Taylor step, as its public code writes it:
    v = v(x, t), x_m = x + dt/2 v, v_m = v(x_m, t + dt/2),
    x' = x + dt v + dt^2/2 (v_m - v) / (dt/2).
    Algebraically x' = x + dt v_m: it equals `Midpoint` up to rounding. An
    empty step (dt = 0) leaves x unchanged (the quotient is taken as 0)."""
    name: ClassVar[str] = 'rf_solver'
    nfe_per_step: ClassVar[int] = 2

    def step(self, velocity, x, t, dt, state):
        h = _per_example(dt, x)
        v = _v(velocity, x, t)
        x_mid = x + 0.5 * h * v
        v_mid = _v(velocity, x_mid, t + 0.5 * dt)
        half = 0.5 * jnp.where(h == 0, 1.0, h)
        dv_dt = (v_mid - v) / half
        dx = h * v + 0.5 * h * h * dv_dt
        return (x + dx).astype(x.dtype), state


@dataclasses.dataclass(frozen=True)
class FireFlow(FixedStepSolver):
    """FireFlow (Deng et al. 2024): midpoint with the midpoint velocity reused.
    With k the cached velocity (init: k = v(x, t0)),
    x_m = x + dt/2 k, k' = v(x_m, t + dt/2), x' = x + dt k', and k' is cached.
    NFE = steps + 1. The cache is kept in float32, or x's dtype if wider, so
    the scan carry's type is fixed (bfloat16 x included)."""
    name: ClassVar[str] = 'fireflow'
    nfe_per_step: ClassVar[int] = 1
    init_nfe: ClassVar[int] = 1

    @staticmethod
    def _cache(k: jax.Array, x: jax.Array) -> jax.Array:
        return k.astype(jnp.promote_types(x.dtype, jnp.float32))

    def init(self, velocity, x, t):
        """The first velocity, k = v(x, t0)."""
        return self._cache(_v(velocity, x, t), x)

    def step(self, velocity, x, t, dt, k):
        h = _per_example(dt, x)
        x_mid = x + 0.5 * h * k
        k_mid = self._cache(_v(velocity, x_mid, t + 0.5 * dt), x)
        return (x + h * k_mid).astype(x.dtype), k_mid


@dataclasses.dataclass(frozen=True)
class Heun(FixedStepSolver):
    """Euler predictor, trapezoid corrector:
    k1 = v(x, t), x' = x + dt/2 (k1 + v(x + dt k1, t + dt))."""
    name: ClassVar[str] = 'heun'
    nfe_per_step: ClassVar[int] = 2

    def step(self, velocity, x, t, dt, state):
        h = _per_example(dt, x)
        k1 = _v(velocity, x, t)
        dx = 0.5 * h * (k1 + _v(velocity, x + h * k1, t + dt))
        return (x + dx).astype(x.dtype), state


class Accelerated:
    """The field of a constant-acceleration model (CAF) along one solve: dx/dt = v0 + t a(x, t),
    with v0 (B, ...) the initial velocity, fixed for the solve, and `acceleration(x, t)` the
    acceleration network (docs/methods.md, CAF). Called as a velocity, so every solver integrates
    it; `ConstantAcceleration` ('caf@N') uses v0 and a directly."""

    def __init__(self, v0: jax.Array, acceleration: Velocity):
        self.v0, self.acceleration = v0, acceleration

    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        return self.v0 + _per_example(t, x) * self.acceleration(x, t)


@dataclasses.dataclass(frozen=True)
class ConstantAcceleration(FixedStepSolver):
    """CAF's update of an `Accelerated` field: x' = x + dt v0 + dt (t + dt / 2) a(x, t), the exact
    step of dx/dt = v0 + t a while a is constant over it; forward (dt > 0) as CAF samples, backward
    (dt < 0, a at the step's start t_{i+1}) as CAF inverts (docs/methods.md, CAF)."""
    name: ClassVar[str] = 'caf'
    nfe_per_step: ClassVar[int] = 1

    def step(self, velocity, x, t, dt, state):
        if not isinstance(velocity, Accelerated):
            raise ValueError("sampler 'caf@N' steps a constant-acceleration model (kind 'caf'); a "
                             'velocity field takes euler, heun, midpoint or rk45')
        h = _per_example(dt, x)
        a = _v(velocity.acceleration, x, t)
        dx = h * velocity.v0 + h * (_per_example(t, x) + 0.5 * h) * a
        return (x + dx).astype(x.dtype), state


class EpsField:
    """The probability-flow field of an eps-prediction diffusion model along one solve: `eps(x, t)` its
    network's noise prediction, `process` its noising process (diffusion.VP); called as a velocity it is
    alpha'(t) x1_hat + sigma'(t) eps, so every solver integrates the probability-flow ODE, and `DDIM`
    ('ddim@N') uses eps directly (docs/methods.md, Diffusion teacher (ddpm))."""

    def __init__(self, eps: Velocity, process: diffusion.Process):
        self.eps, self.process = eps, process

    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        return diffusion.eps_velocity(self.process, x, self.eps(x, t), t)


@dataclasses.dataclass(frozen=True)
class DDIM(FixedStepSolver):
    """DDIM (eta = 0) on an `EpsField`: x' = alpha(t + dt) x1_hat + sigma(t + dt) eps(x, t), forward
    (dt > 0) as DDIM samples, backward (dt < 0) as DDIM inverts (docs/methods.md, Diffusion teacher (ddpm))."""
    name: ClassVar[str] = 'ddim'
    nfe_per_step: ClassVar[int] = 1

    def step(self, velocity, x, t, dt, state):
        if not isinstance(velocity, EpsField):
            raise ValueError("sampler 'ddim@N' steps an eps-prediction diffusion model (kind 'ddpm'); a "
                             'velocity field takes euler, heun, midpoint or rk45')
        eps = _v(velocity.eps, x, t)
        return diffusion.ddim_step(velocity.process, x, eps, t, t + dt), state


FIXED_STEP = {'euler': Euler, 'heun': Heun, 'midpoint': Midpoint, 'fireflow': FireFlow, 'rf_solver': RFSolver,
              'caf': ConstantAcceleration, 'ddim': DDIM}


# ------------------------------------------------------------------- rk45


class _Dopri5(diffrax.Dopri5):
    """Dopri5 evaluating its FSAL first stage once in `init`, not per attempt.

    Stock diffrax sets `first_step=True` and evaluates the first stage inside
    `step`, keeping that flag until a step is accepted.
    """

    def init(self, terms, t0, t1, y0, args):
        # Unpacking fails loudly if diffrax changes its (first_step, f0) state.
        _first_step, _placeholder = super().init(terms, t0, t1, y0, args)
        return jnp.array(False), terms.vf(t0, y0, args)


def _diffeqsolve(vf: Callable, x: jax.Array, tol: Any, t0: Time,
                 t1: Time) -> diffrax.Solution:
    """Dopri5 on the whole batch as one state (RMS error norm over it all).

    `tol` holds rtol, atol and max_steps (an RK45 or a Sampler).
    """
    return diffrax.diffeqsolve(
        diffrax.ODETerm(vf), _Dopri5(), t0=t0, t1=t1, dt0=None, y0=x,
        stepsize_controller=diffrax.PIDController(
            rtol=tol.rtol, atol=tol.atol),
        saveat=diffrax.SaveAt(t1=True), max_steps=tol.max_steps,
        throw=False)


def _rk45_solution(velocity: Velocity, x: jax.Array, tol: Any, t0: Time,
                   t1: Time) -> diffrax.Solution:
    """rk45 from scalar t0 to t1: dx/dt = v(x, t)."""
    vf = lambda t, y, args: velocity(y, _time(t, y)).astype(y.dtype)
    return _diffeqsolve(vf, x, tol, t0, t1)


def _rk45_window_solution(velocity: Velocity, x: jax.Array, tol: Any,
                          t0: jax.Array, t1: jax.Array) -> diffrax.Solution:
    """rk45 over per-example windows in normalised time s in [0, 1]:
    dx/ds = (t1 - t0) v(x, t0 + s (t1 - t0)), t0 and t1 of shape (B,)."""
    span = t1 - t0

    def vf(s, y, args):
        t = (t0 + s * span).astype(jnp.float32)
        return (_per_example(span, y) * velocity(y, t)).astype(y.dtype)

    return _diffeqsolve(vf, x, tol, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class RK45:
    """Adaptive Dopri5 (PID step control; NaNs past `max_steps`)."""
    rtol: float = 1e-5
    atol: float = 1e-5
    max_steps: int = 4096
    key: ClassVar[str] = 'rk45'
    name: ClassVar[str] = 'rk45'

    def solve(self, velocity: Velocity, x: jax.Array, t0: Time,
              t1: Time) -> tuple[jax.Array, jax.Array]:
        """Returns (x(t1), nfe), nfe = 6 * num_steps + 1; NaNs on failure."""
        t0, t1 = _endpoints(t0, t1, x)
        if _is_scalar(t0, t1):
            sol = _rk45_solution(velocity, x, self, t0, t1)
        else:
            sol = _rk45_window_solution(velocity, x, self, t0, t1)
        ok = sol.result == diffrax.RESULTS.successful
        x1 = jnp.where(ok, sol.ys[-1], jnp.nan).astype(x.dtype)
        nfe = 6 * sol.stats['num_steps'] + 1  # See the module docstring.
        return x1, jnp.asarray(nfe, jnp.int32)


# ---------------------------------------------------------------- Sampler


@dataclasses.dataclass(frozen=True)
class Sampler:
    """An ODE sampler: a fixed-step solver with `steps` (on a time `grid`),
    or adaptive rk45 (with rtol, atol, max_steps). `solver` is the solver
    object; `key`, `nfe_per_step`, `init`, `step` and `solve` are its."""
    name: str
    steps: int | None = None
    rtol: float = 1e-5
    atol: float = 1e-5
    max_steps: int = 4096
    grid: TimeGrid = UNIFORM

    def __post_init__(self):
        where = f'Sampler(name={self.name!r}, steps={self.steps!r})'
        _check(self.name, self.steps, where)
        if self.name == 'rk45' and self.grid != UNIFORM:
            raise ValueError(f'{where}: adaptive rk45 takes no time grid')

    @property
    def solver(self) -> FixedStepSolver | RK45:
        """The solver object named: FIXED_STEP[name](steps, grid) or RK45."""
        if self.name == 'rk45':
            return RK45(self.rtol, self.atol, self.max_steps)
        return FIXED_STEP[self.name](self.steps, self.grid)

    @property
    def key(self) -> str:
        """Short label, e.g. 'euler@8', 'heun@5:edm' or 'rk45'."""
        return self.solver.key

    @property
    def nfe_per_step(self) -> int | None:
        """Velocity calls per step; None for adaptive rk45."""
        return None if self.name == 'rk45' else self.solver.nfe_per_step

    def init(self, velocity: Velocity, x: jax.Array, t: Time) -> Any:
        """The fixed-step solver's per-call state (see FixedStepSolver)."""
        return self.solver.init(velocity, x, t)

    def step(self, velocity: Velocity, x: jax.Array, t: Time, dt: Time,
             state: Any) -> tuple[jax.Array, Any]:
        """One step of the fixed-step solver; returns (x, state)."""
        return self.solver.step(velocity, x, t, dt, state)

    def solve(self, velocity: Velocity, x: jax.Array, t0: Time,
              t1: Time) -> tuple[jax.Array, jax.Array]:
        """The solver's solve from t0 to t1; returns (x(t1), nfe)."""
        return self.solver.solve(velocity, x, t0, t1)


def parse_sampler(spec: str, *, rtol: float = 1e-5,
                  atol: float = 1e-5) -> Sampler:
    """Parses 'euler@8' / 'heun@4:edm' / 'midpoint@2:edm=3' /
    'fireflow@4:shift=1.15' / 'rf_solver@4' / 'rk45'.

    Grammar: `name@N[:grid]` with grid uniform (default), edm, edm=RHO or
    shift=MU;
    `rk45` (alias 'dopri5') takes neither steps nor a grid.
    """
    where = f'sampler {spec!r}'
    if not isinstance(spec, str):
        raise ValueError(f"{where}: expected a string like 'euler@8' or 'rk45'")
    head, colon, grid_text = spec.strip().partition(':')
    name, at, steps_str = head.partition('@')
    name = _ALIASES.get(name.lower(), name.lower())
    steps = None  # A non-numeric step string stays a str and fails _check.
    if at:
        if re.fullmatch(r'[0-9]+', steps_str):
            steps = int(steps_str)
        else:
            steps = steps_str
    _check(name, steps, where)
    if name == 'rk45' and colon:
        raise ValueError(f'{where}: adaptive rk45 takes no time grid')
    grid = _parse_grid(grid_text.lower(), where) if colon else UNIFORM
    return Sampler(name, steps, rtol=rtol, atol=atol, grid=grid)


# -------------------------------------------------------------- functions


def solve(velocity: Velocity, x: jax.Array, sampler: Any, *, t0: Time,
          t1: Time) -> tuple[jax.Array, jax.Array]:
    """Integrates dx/dt = v(x, t) from t0 to t1; returns (x(t1), nfe).

    t0 < t1 runs noise -> data, t0 > t1 runs data -> noise; t0 and t1 are
    floats or per-example (B,) arrays. `sampler` is a Sampler or a solver
    object. `nfe` is an int32 scalar counting velocity calls. rk45 failures
    (max_steps) give NaNs.
    """
    return sampler.solve(velocity, x, t0, t1)


def sample(velocity: Velocity, x0: jax.Array, sampler: Any, *,
           eps: float = 1e-3) -> tuple[jax.Array, jax.Array]:
    """Maps noise x0 to data: solves from t = eps to 1. Returns (x1, nfe)."""
    return solve(velocity, x0, sampler, t0=eps, t1=1.0)


def invert(velocity: Velocity, x1: jax.Array, sampler: Any, *,
           eps: float = 1e-3) -> tuple[jax.Array, jax.Array]:
    """Maps data x1 to noise: solves from t = 1 to eps. Returns (x0, nfe)."""
    return solve(velocity, x1, sampler, t0=1.0, t1=eps)


def _grid(steps: int, t0: float, t1: float) -> tuple[jax.Array, jax.Array]:
    """Start times and (signed) step sizes of a uniform grid from t0 to t1."""
    ts = jnp.linspace(t0, t1, steps + 1, dtype=jnp.float32)
    return ts[:-1], ts[1:] - ts[:-1]


def trajectory(velocity: Velocity, x: jax.Array, *, steps: int, t0: float,
               t1: float) -> tuple[jax.Array, jax.Array]:
    """Euler path from t0 to t1 for plots and straightness.

    Returns xs of shape (steps + 1, *x.shape) including the start, and vs of
    shape (steps, *x.shape), the velocity used at each step.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(
            f'trajectory: steps must be an integer >= 1, got {steps!r}')

    def body(y, t_dt):
        t, dt = t_dt
        v = velocity(y, _time(t, y))
        y = (y + dt * v).astype(y.dtype)
        return y, (y, v.astype(y.dtype))

    _, (xs, vs) = jax.lax.scan(body, x, _grid(steps, t0, t1))
    return jnp.concatenate([x[None], xs], axis=0), vs


@functools.lru_cache(maxsize=64)
def make_sampler(apply: Apply, sampler: Any, *, eps: float = 1e-3,
                 inverse: bool = False
                 ) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """Returns jitted `fn(params, x) -> (x_out, nfe)` for a model `apply`.

    `sampler` is a Sampler or a solver object. params are a traced argument
    (not closed over), so weights are not baked into the executable and one
    compilation serves every set of params (and, cached, every model with
    the same `apply`).
    """
    run = invert if inverse else sample

    @jax.jit
    def fn(params, x):
        velocity = functools.partial(apply, params)
        return run(velocity, x, sampler, eps=eps)

    return fn
