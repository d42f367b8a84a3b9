"""ODE samplers for rectified flows: fixed-step Euler/Heun/midpoint and rk45.

Convention: t = 0 is noise, t = 1 is data. A velocity is a callable
`v(x, t)` with x of shape (B, ...) and t of shape (B,) float32. Sampling
integrates from t = eps to 1; inversion from t = 1 to eps.

Everything here is traceable under `jax.jit` and works on sharded global
arrays: step loops are `lax.scan` / diffrax while loops, never Python loops.

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
import re
from typing import Any, Callable

import diffrax
import jax
import jax.numpy as jnp

Velocity = Callable[[jax.Array, jax.Array], jax.Array]
Apply = Callable[[Any, jax.Array, jax.Array], jax.Array]

SOLVERS = ('euler', 'heun', 'midpoint', 'rk45')
_FIXED_NFE_PER_STEP = {'euler': 1, 'heun': 2, 'midpoint': 2}
_ALIASES = {'dopri5': 'rk45'}


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
    elif isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f'{where}: steps must be an integer >= 1')


@dataclasses.dataclass(frozen=True)
class Sampler:
    """An ODE sampler: a fixed-step solver with `steps`, or adaptive rk45."""
    name: str
    steps: int | None = None
    rtol: float = 1e-5
    atol: float = 1e-5
    max_steps: int = 4096

    def __post_init__(self):
        _check(self.name, self.steps,
               f'Sampler(name={self.name!r}, steps={self.steps!r})')

    @property
    def key(self) -> str:
        """Short label, e.g. 'euler@8' or 'rk45'."""
        return self.name if self.steps is None else f'{self.name}@{self.steps}'


def parse_sampler(spec: str, *, rtol: float = 1e-5,
                  atol: float = 1e-5) -> Sampler:
    """Parses 'euler@8' / 'heun@4' / 'midpoint@2' / 'rk45' (alias 'dopri5')."""
    where = f'sampler {spec!r}'
    if not isinstance(spec, str):
        raise ValueError(f"{where}: expected a string like 'euler@8' or 'rk45'")
    name, at, steps_str = spec.strip().partition('@')
    name = _ALIASES.get(name.lower(), name.lower())
    steps = None  # A non-numeric step string stays a str and fails _check.
    if at:
        if re.fullmatch(r'[0-9]+', steps_str):
            steps = int(steps_str)
        else:
            steps = steps_str
    _check(name, steps, where)
    return Sampler(name, steps, rtol=rtol, atol=atol)


def _time(t: jax.Array, x: jax.Array) -> jax.Array:
    """Broadcasts a scalar time to the (B,) float32 vector velocities expect."""
    return jnp.full((x.shape[0],), t, dtype=jnp.float32)


def _fixed_step(name: str, velocity: Velocity, x, t, dt):
    """One step of a fixed-step solver from time t with (signed) step dt."""
    v = lambda y, s: velocity(y, _time(s, y))
    if name == 'euler':
        dx = dt * v(x, t)
    elif name == 'midpoint':
        dx = dt * v(x + 0.5 * dt * v(x, t), t + 0.5 * dt)
    else:  # heun: Euler predictor, trapezoid corrector.
        k1 = v(x, t)
        dx = 0.5 * dt * (k1 + v(x + dt * k1, t + dt))
    return (x + dx).astype(x.dtype)


def _grid(steps: int, t0: float, t1: float) -> tuple[jax.Array, jax.Array]:
    """Start times and (signed) step sizes of a uniform grid from t0 to t1."""
    ts = jnp.linspace(t0, t1, steps + 1, dtype=jnp.float32)
    return ts[:-1], ts[1:] - ts[:-1]


class _Dopri5(diffrax.Dopri5):
    """Dopri5 evaluating its FSAL first stage once in `init`, not per attempt.

    Stock diffrax sets `first_step=True` and evaluates the first stage inside
    `step`, keeping that flag until a step is accepted.
    """

    def init(self, terms, t0, t1, y0, args):
        # Unpacking fails loudly if diffrax changes its (first_step, f0) state.
        _first_step, _placeholder = super().init(terms, t0, t1, y0, args)
        return jnp.array(False), terms.vf(t0, y0, args)


def _rk45_solution(velocity: Velocity, x: jax.Array, sampler: Sampler,
                   t0: float, t1: float) -> diffrax.Solution:
    """Dopri5 on the whole batch as one state (RMS error norm over it all)."""
    term = diffrax.ODETerm(
        lambda t, y, args: velocity(y, _time(t, y)).astype(y.dtype))
    return diffrax.diffeqsolve(
        term, _Dopri5(), t0=t0, t1=t1, dt0=None, y0=x,
        stepsize_controller=diffrax.PIDController(
            rtol=sampler.rtol, atol=sampler.atol),
        saveat=diffrax.SaveAt(t1=True), max_steps=sampler.max_steps,
        throw=False)


def _solve_rk45(velocity: Velocity, x: jax.Array, sampler: Sampler,
                t0: float, t1: float) -> tuple[jax.Array, jax.Array]:
    """rk45 solve returning (x(t1), nfe); NaNs if the solve failed."""
    sol = _rk45_solution(velocity, x, sampler, t0, t1)
    ok = sol.result == diffrax.RESULTS.successful
    x1 = jnp.where(ok, sol.ys[-1], jnp.nan).astype(x.dtype)
    nfe = 6 * sol.stats['num_steps'] + 1  # See the module docstring.
    return x1, jnp.asarray(nfe, jnp.int32)


def solve(velocity: Velocity, x: jax.Array, sampler: Sampler, *,
          t0: float, t1: float) -> tuple[jax.Array, jax.Array]:
    """Integrates dx/dt = v(x, t) from t0 to t1; returns (x(t1), nfe).

    t0 < t1 runs noise -> data, t0 > t1 runs data -> noise. `nfe` is an int32
    scalar counting velocity calls. rk45 failures (max_steps) give NaNs.
    """
    if sampler.name == 'rk45':
        return _solve_rk45(velocity, x, sampler, t0, t1)

    def body(y, t_dt):
        return _fixed_step(sampler.name, velocity, y, *t_dt), None

    x1, _ = jax.lax.scan(body, x, _grid(sampler.steps, t0, t1))
    nfe = _FIXED_NFE_PER_STEP[sampler.name] * sampler.steps
    return x1, jnp.asarray(nfe, jnp.int32)


def sample(velocity: Velocity, x0: jax.Array, sampler: Sampler, *,
           eps: float = 1e-3) -> tuple[jax.Array, jax.Array]:
    """Maps noise x0 to data: solves from t = eps to 1. Returns (x1, nfe)."""
    return solve(velocity, x0, sampler, t0=eps, t1=1.0)


def invert(velocity: Velocity, x1: jax.Array, sampler: Sampler, *,
           eps: float = 1e-3) -> tuple[jax.Array, jax.Array]:
    """Maps data x1 to noise: solves from t = 1 to eps. Returns (x0, nfe)."""
    return solve(velocity, x1, sampler, t0=1.0, t1=eps)


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
def make_sampler(apply: Apply, sampler: Sampler, *, eps: float = 1e-3,
                 inverse: bool = False
                 ) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """Returns jitted `fn(params, x) -> (x_out, nfe)` for a model `apply`.

    params are a traced argument (not closed over), so weights are not baked
    into the executable and one compilation serves every set of params (and, cached,
    every model with the same `apply`).
    """
    run = invert if inverse else sample

    @jax.jit
    def fn(params, x):
        velocity = functools.partial(apply, params)
        return run(velocity, x, sampler, eps=eps)

    return fn
