"""Model kinds: a trained model is (kind, params, meta), and every consumer goes through the kind.

Training initialises parameters through `kind.init`, the export's meta.json records
`kind.meta()` ('kind' and its network configs), and loading, evaluation, coupling generation and
inversion sample through `kind.sample` / `kind.invert` with a solver. No consumer asks which
method trained a model, so any kind can be a teacher.

    velocity   one network v(x, t[, label]): rectified flow, reflow, distillation, SlimFlow
               students (the kind of every export written before kinds existed)
    caf        constant acceleration flow: a velocity network v(x, t) and an acceleration
               network a(x, t, v0) (docs/methods.md, CAF)
    ddpm       a diffusion teacher: one network eps(x, t[, label]) predicting the noise of a VP
               process, read as its probability-flow velocity (docs/methods.md, Diffusion teacher (ddpm))
    piecewise  PeRFlow: one network read as a straight line's velocity on each of K time windows,
               each window solved on its own (docs/methods.md, PeRFlow)

A kind is a frozen, hashable dataclass (it keys jit caches). Every kind has `sample`, `invert`,
`reconstruct` (invert, then regenerate), `path` (the Euler path straightness is measured on),
`start` (the time its solves start at), `supports(sampler)` and, for exports, `meta`; a kind
with a velocity of (x, t) alone also has `velocity`, `solve` and `apply`. Later kinds add their own
fields and updates behind the same interface: PeRFlow windowed sampling.

Classifier-free guidance (docs/methods.md, Guidance): every kind has a `guidance` scale w (1: none), set by
`guided(kind, w, field)` for a class-conditional network trained with `model.label_dropout` > 0 (its
`null_label`); each network call then gives out(null) + w (out(label) - out(null)), two calls where
w is neither 1 nor 0 (w = 0: the null label's alone), and the NFE a kind reports counts them. The
scale is how a model is sampled, not what it is: exports' meta does not record it.
"""

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections

from flowjax import errors, models
from flowjax.flows import diffusion, solvers
from flowjax.flows import windows as windows_lib

Velocity = Callable[[jax.Array, jax.Array], jax.Array]


def _guide(out: Callable[[jax.Array | None], jax.Array], label: jax.Array | None, scale: float,
           null: int | None) -> jax.Array:
    """A network output `out(label)` under classifier-free guidance of `scale`: out(label) at 1 (or
    without labels), out(null) at 0, else out(null) + scale (out(label) - out(null))."""
    if label is None or scale == 1.0:
        return out(label)
    uncond = out(jnp.full_like(label, null))
    if scale == 0.0:
        return uncond
    return uncond + scale * (out(label) - uncond)


class _Guidance:
    """What guidance adds to a kind: its `guidance` scale (a dataclass field of every kind), `null_label`
    and how many network calls one guided call makes."""

    guidance: float

    @property
    def calls(self) -> int:
        """Network calls per velocity evaluation: 2 with guidance other than 1 and 0, else 1."""
        return 1 if self.guidance in (0.0, 1.0) else 2

    @property
    def null_label(self) -> int | None:
        """The class id the network was trained to read as no class (None: not trained for guidance)."""
        return None

    def network(self, apply: Callable[..., jax.Array], params: Any, label: jax.Array | None) -> Velocity:
        """`(x, t) -> apply(params, x, t, label=label)` guided by the kind's scale (the plain partial at 1)."""
        if label is None or self.guidance == 1.0:
            return functools.partial(apply, params) if label is None else functools.partial(apply, params, label=label)
        return lambda x, t: _guide(lambda y: apply(params, x, t, label=y), label, self.guidance, self.null_label)


def check_guidance(value: Any, field: str) -> float:
    """A guidance scale of a config field: a finite number >= 0 (1: none), else a one-line ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float('inf'):
        raise errors.ConfigError(f'{field}={value!r}: expected a guidance scale, a finite number >= 0 (1: no guidance)')
    return float(value)


def guided(kind: 'Kind', scale: float, field: str, name: str = 'the model') -> 'Kind':
    """`kind` sampled with classifier-free guidance `scale` (`field` and the model's `name` for errors):
    unchanged at 1; else its network must be class-conditional with a null label (trained with
    model.label_dropout > 0), or a one-line UserError."""
    scale = check_guidance(scale, field)
    if scale == 1.0:
        return kind
    if getattr(kind, 'null_label', None) is None:
        why = 'is not class-conditional' if not kind.num_classes else 'has no null label'
        raise errors.UserError(f'{field}={scale:g}: {name} (kind {kind.name!r}) {why}; guidance needs a class-conditional '
                               'model trained with model.label_dropout > 0')
    return dataclasses.replace(kind, guidance=scale)


class _RoundTrip:
    """`reconstruct` of a kind whose sampling and inversion are independent solves."""

    def reconstruct(self, params: Any, x1: jax.Array, sampler: solvers.Sampler, *, eps: float,
                    label: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Data -> noise -> data with `sampler` both ways; (x1 regenerated, nfe of both solves)."""
        z, nfe_in = self.invert(params, x1, sampler, eps=eps, label=label)
        x, nfe_out = self.sample(params, z, sampler, eps=eps, label=label)
        return x, nfe_in + nfe_out


class _VelocityKind(_RoundTrip, _Guidance):
    """What every velocity-giving kind shares: sampling and inversion by integrating `apply`."""

    name: ClassVar[str] = 'velocity'
    # The forward marginal of the path it was trained on (PeRFlow noises data to a window start by it).
    process: ClassVar[diffusion.Process] = diffusion.Linear()
    num_classes: int
    apply: Callable[..., jax.Array]  # (params, x, t, dropout_rng=None, label=None) -> v

    def velocity(self, params: Any, label: jax.Array | None = None) -> Velocity:
        """v(x, t) of these params (class `label` (B,) for a class-conditional model), guided by `guidance`."""
        return self.network(self.apply, params, label)

    def solve(self, params: Any, x: jax.Array, sampler: solvers.Sampler, *, t0: solvers.Time, t1: solvers.Time,
              label: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """The ODE from t0 to t1 (floats, or per-example (B,) windows) with `sampler`; (x at t1, nfe)."""
        x, nfe = solvers.solve(self.velocity(params, label), x, sampler, t0=t0, t1=t1)
        return x, nfe * self.calls

    def sample(self, params: Any, x0: jax.Array, sampler: solvers.Sampler, *, eps: float,
               label: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Noise x0 -> data: the ODE from t = eps to 1 with `sampler`; (x1, nfe)."""
        return self.solve(params, x0, sampler, t0=eps, t1=1.0, label=label)

    def invert(self, params: Any, x1: jax.Array, sampler: solvers.Sampler, *, eps: float,
               label: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Data x1 -> noise: the ODE from t = 1 to eps; (x0, nfe)."""
        return self.solve(params, x1, sampler, t0=1.0, t1=eps, label=label)

    def path(self, params: Any, x0: jax.Array, steps: int, *, eps: float,
             label: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(xs, vs): the Euler path from `start(eps)` to 1 in `steps` steps and its step velocities."""
        return solvers.trajectory(self.velocity(params, label), x0, steps=steps, t0=eps, t1=1.0)

    def start(self, eps: float) -> float:
        """The time sampling starts at (and inversion ends at): eps, the flow's smallest time."""
        return eps

    def supports(self, sampler: solvers.Sampler) -> bool:
        """Whether `sampler` applies to this kind (caf@N steps constant-acceleration models only, ddim@N
        eps models of kind 'ddpm')."""
        return sampler.name not in ('caf', 'ddim')


class _OneNetwork:
    """A kind of one network of config `model` (sorted JSON) called `apply(params, x, t, dropout_rng=None,
    label=None)`: its module, class count and initialisation."""

    model: str

    @classmethod
    def from_model_config(cls, config: ml_collections.ConfigDict | dict, **fields):
        """The kind of network config `config` (and the kind's other `fields`)."""
        data = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
        return cls(json.dumps(_jsonable(data), sort_keys=True), **fields)

    @property
    def model_config(self) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(json.loads(self.model))

    @functools.cached_property
    def module(self):
        return models.build(self.model_config)

    @property
    def num_classes(self) -> int:
        return models.num_classes(self.model_config)

    @property
    def null_label(self) -> int | None:
        return models.null_label(self.model_config)

    @property
    def apply(self) -> Callable[..., jax.Array]:
        """The training call `apply(params, x, t, dropout_rng=None, label=None)`."""
        return models.apply_fn(self.module)

    def init(self, key: jax.Array, sample_shape: tuple[int, ...]) -> Any:
        """Fresh parameters for examples of `sample_shape` (traceable: jit it with out_shardings)."""
        dummy = jnp.zeros((1, *sample_shape), jnp.float32)
        label = (jnp.zeros((1,), jnp.int32),) if self.num_classes else ()
        return self.module.init(key, dummy, jnp.zeros((1,), jnp.float32), *label)


@dataclasses.dataclass(frozen=True)
class VelocityField(_OneNetwork, _VelocityKind):
    """One network giving the velocity v(x, t[, label]); `model` is its config as sorted JSON."""

    model: str
    guidance: float = 1.0

    def meta(self) -> dict:
        """What an export's meta.json records of the kind."""
        return {'kind': self.name, 'model': json.loads(self.model)}


@dataclasses.dataclass(frozen=True)
class Diffusion(_OneNetwork, _VelocityKind):
    """A DDPM teacher (docs/methods.md, Diffusion teacher (ddpm)): one network eps(x, t[, label]) predicting
    the noise of x_t = alpha(t) x1 + sigma(t) eps under the VP process of `schedule` and `timesteps`
    (`process`, flowjax time t = 1 - k / T). Its velocity is the probability-flow field
    (`solvers.EpsField`), which ddim@N steps by DDIM and every other sampler integrates.

    Sampling starts at t = 0 (k = T, pure noise) whatever eps, and runs to 1; inversion runs from 1 to 0.
    EDM grids are refused (they need t > 0 at the noise end), and so is caf@N.
    """

    name: ClassVar[str] = 'ddpm'
    model: str
    schedule: str = 'linear'
    timesteps: int = 1000
    guidance: float = 1.0

    @functools.cached_property
    def process(self) -> diffusion.VP:
        """The VP process of the schedule and step count (ValueError for bad ones)."""
        return diffusion.VP(self.schedule, self.timesteps)

    def eps(self, params: Any, label: jax.Array | None = None) -> Velocity:
        """eps(x, t): the network's noise prediction of these params (class `label` (B,) if conditional),
        guided by `guidance` (the probability-flow velocity is affine in eps, so guiding eps guides it)."""
        return _VelocityKind.velocity(self, params, label)

    def velocity(self, params: Any, label: jax.Array | None = None) -> solvers.EpsField:
        """The probability-flow velocity of eps(x, t), an `EpsField` (ddim@N reads its eps)."""
        return solvers.EpsField(self.eps(params, label), self.process)

    def sample(self, params: Any, x0: jax.Array, sampler: solvers.Sampler, *, eps: float,
               label: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Noise x0 -> data from t = 0 (eps unused) to 1; (x1, nfe)."""
        del eps
        return self.solve(params, x0, sampler, t0=0.0, t1=1.0, label=label)

    def invert(self, params: Any, x1: jax.Array, sampler: solvers.Sampler, *, eps: float,
               label: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Data x1 -> noise, from t = 1 to 0 (eps unused); (x0, nfe)."""
        del eps
        return self.solve(params, x1, sampler, t0=1.0, t1=0.0, label=label)

    def path(self, params: Any, x0: jax.Array, steps: int, *, eps: float,
             label: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(xs, vs): the Euler path of the probability-flow ODE from 0 to 1 and its step velocities."""
        del eps
        return solvers.trajectory(self.velocity(params, label), x0, steps=steps, t0=0.0, t1=1.0)

    def start(self, eps: float) -> float:
        """A diffusion model's solves start at t = 0, its last step k = T."""
        return 0.0

    def supports(self, sampler: solvers.Sampler) -> bool:
        """Every sampler but caf@N, on the uniform or a shifted grid: ddim@N is DDIM, the others integrate the
        probability-flow ODE; an EDM grid does not apply (its sigma = (1 - t) / t is infinite at t = 0)."""
        return sampler.name != 'caf' and not isinstance(getattr(sampler, 'grid', None), solvers.EdmGrid)

    def meta(self) -> dict:
        """What an export's meta.json records of the kind."""
        return {'kind': self.name, 'model': json.loads(self.model), 'schedule': self.schedule,
                'timesteps': self.timesteps}


@dataclasses.dataclass(frozen=True)
class VelocityFunction(_VelocityKind):
    """A velocity given as a pure function `apply(params, x, t, dropout_rng=None, label=None)`
    rather than a network config: an analytic flow with a known solution, or a network built in
    code. It samples and inverts like a velocity field; it has no export meta."""

    apply: Callable[..., jax.Array]
    num_classes: int = 0
    null_label: int | None = None  # the class id read as no class, for guidance (None: none)
    guidance: float = 1.0


@dataclasses.dataclass(frozen=True)
class ConstantAcceleration(_Guidance):
    """CAF (docs/methods.md, CAF): x_t = x0 + v0 t + a t^2 / 2 with a velocity network giving the
    initial velocity v0 = v(x, t) and an acceleration network a(x, t, v0). Both networks have the
    architecture `model` (sorted JSON) and read 2C channels, x beside a velocity, and give C
    (`channels`); the velocity network's velocity slot is zeros, and so is the acceleration
    network's when initial velocity conditioning (`ivc`) is off. `h` is the training's v0 = h (x1 - x0)
    (recorded; sampling does not use it). Params are {'velocity': ..., 'acceleration': ...}.

    Sampling starts at t = 0 whatever eps (CAF's interpolant and time grid include it):
    v0 = v(x0, 0), then `sampler` solves dx/dt = v0 + t a(x, t, v0) (`solvers.Accelerated`) from
    0 to 1; caf@N is CAF's N-step update (NFE N + 1), any other sampler on the uniform or a shifted grid
    integrates the same field (an EDM grid needs t > 0 at its noise end: `supports` refuses it).
    Inversion takes v0 = v(x1, 1) from the data and solves from 1 to 0; `reconstruct` regenerates
    with that same v0 (NFE 2N + 1 with caf@N).
    """

    name: ClassVar[str] = 'caf'
    model: str
    channels: int
    h: float = 1.5
    ivc: bool = True
    guidance: float = 1.0

    @classmethod
    def from_model_config(cls, config: ml_collections.ConfigDict | dict, *, channels: int, h: float = 1.5,
                          ivc: bool = True) -> 'ConstantAcceleration':
        data = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
        return cls(json.dumps(_jsonable(data), sort_keys=True), int(channels), float(h), bool(ivc))

    @property
    def model_config(self) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(json.loads(self.model))

    @functools.cached_property
    def module(self):
        config = self.model_config
        config.out_channels = self.channels
        return models.build(config)

    @property
    def num_classes(self) -> int:
        return models.num_classes(self.model_config)

    @property
    def null_label(self) -> int | None:
        return models.null_label(self.model_config)

    @property
    def apply(self) -> Callable[..., jax.Array]:
        """One network's training call `apply(params, x2, t, dropout_rng=None, label=None)` on the
        2C-channel input `inputs(x, v)`."""
        return models.apply_fn(self.module)

    @staticmethod
    def inputs(x: jax.Array, v: jax.Array | None = None) -> jax.Array:
        """A network's input: x beside the velocity v (zeros when None) along the channel axis."""
        return jnp.concatenate([x, jnp.zeros_like(x) if v is None else v.astype(x.dtype)], axis=-1)

    def network_init(self, key: jax.Array, sample_shape: tuple[int, ...]) -> Any:
        """Fresh parameters of one network (either: they have the same shapes)."""
        dummy = jnp.zeros((1, *sample_shape[:-1], 2 * sample_shape[-1]), jnp.float32)
        label = (jnp.zeros((1,), jnp.int32),) if self.num_classes else ()
        return self.module.init(key, dummy, jnp.zeros((1,), jnp.float32), *label)

    def init(self, key: jax.Array, sample_shape: tuple[int, ...]) -> Any:
        """Fresh parameters of both networks."""
        k_v, k_a = jax.random.split(key)
        return {'velocity': self.network_init(k_v, sample_shape),
                'acceleration': self.network_init(k_a, sample_shape)}

    def initial_velocity(self, params: Any, x: jax.Array, t: jax.Array, *, dropout_rng: jax.Array | None = None,
                         label: jax.Array | None = None) -> jax.Array:
        """v(x, t) of the velocity network's `params` (one network's), t of shape (B,)."""
        return self.apply(params, self.inputs(x), t, dropout_rng, label=label)

    def acceleration(self, params: Any, x: jax.Array, t: jax.Array, v0: jax.Array, *,
                     dropout_rng: jax.Array | None = None, label: jax.Array | None = None) -> jax.Array:
        """a(x, t, v0) of the acceleration network's `params`; v0 enters only with `ivc`."""
        return self.apply(params, self.inputs(x, v0 if self.ivc else None), t, dropout_rng, label=label)

    def field(self, params: Any, v0: jax.Array, label: jax.Array | None = None) -> solvers.Accelerated:
        """dx/dt = v0 + t a(x, t, v0) of these params (both networks'), a guided by `guidance`."""
        accel = lambda x, t: _guide(lambda y: self.acceleration(params['acceleration'], x, t, v0, label=y), label,
                                    self.guidance, self.null_label)
        return solvers.Accelerated(v0, accel)

    def _v0(self, params: Any, x: jax.Array, t: float, label: jax.Array | None) -> jax.Array:
        """v0 = v(x, t) of the velocity network, guided by `guidance`."""
        t = jnp.full((x.shape[0],), t, jnp.float32)
        return _guide(lambda y: self.initial_velocity(params['velocity'], x, t, label=y), label, self.guidance,
                      self.null_label)

    def _solve(self, params: Any, x: jax.Array, sampler: solvers.Sampler, t0: float, t1: float,
               label: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """The solve from t0 to t1 with v0 = v(x, t0) of the start; (x at t1, nfe with the v0 call)."""
        x_end, nfe = solvers.solve(self.field(params, self._v0(params, x, t0, label), label), x, sampler,
                                   t0=t0, t1=t1)
        return x_end, (nfe + 1) * self.calls

    def sample(self, params: Any, x0: jax.Array, sampler: solvers.Sampler, *, eps: float,
               label: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Noise x0 -> data from t = 0 (eps unused) with v0 = v(x0, 0); (x1, nfe) with the v0 call counted."""
        del eps
        return self._solve(params, x0, sampler, 0.0, 1.0, label)

    def invert(self, params: Any, x1: jax.Array, sampler: solvers.Sampler, *, eps: float,
               label: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Data x1 -> noise at t = 0 with v0 = v(x1, 1); (x0, nfe)."""
        del eps
        return self._solve(params, x1, sampler, 1.0, 0.0, label)

    def reconstruct(self, params: Any, x1: jax.Array, sampler: solvers.Sampler, *, eps: float,
                    label: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Data -> noise -> data, both solves with the v0 = v(x1, 1) of the data; NFE 2N + 1 with caf@N."""
        del eps
        field = self.field(params, self._v0(params, x1, 1.0, label), label)
        z, nfe_in = solvers.solve(field, x1, sampler, t0=1.0, t1=0.0)
        x, nfe_out = solvers.solve(field, z, sampler, t0=0.0, t1=1.0)
        return x, (nfe_in + nfe_out + 1) * self.calls

    def path(self, params: Any, x0: jax.Array, steps: int, *, eps: float,
             label: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(xs, vs): the Euler path of dx/dt = v0 + t a from 0 to 1 and its step velocities."""
        del eps
        return solvers.trajectory(self.field(params, self._v0(params, x0, 0.0, label), label), x0, steps=steps,
                                  t0=0.0, t1=1.0)

    def start(self, eps: float) -> float:
        """CAF's solves start at t = 0."""
        return 0.0

    def supports(self, sampler: solvers.Sampler) -> bool:
        """Every sampler but ddim@N (eps models only), on the uniform or a shifted grid: caf@N is CAF's own update,
        the others integrate its field. An EDM grid does not apply: CAF's solves start at t = 0, where its
        sigma = (1 - t) / t is infinite (docs/methods.md, CAF)."""
        return sampler.name != 'ddim' and not isinstance(getattr(sampler, 'grid', None), solvers.EdmGrid)

    def meta(self) -> dict:
        """What an export's meta.json records of the kind."""
        return {'kind': self.name, 'model': json.loads(self.model), 'channels': self.channels, 'h': self.h,
                'ivc': self.ivc}


# ---------------------------------------------------------------------------------------------------------------
# PeRFlow: the piecewise kind (docs/methods.md, PeRFlow). One network of `model`, read as the velocity of a
# straight line on each of K windows of [0, 1]; sampling solves every window on its own.


@dataclasses.dataclass(frozen=True)
class Piecewise(_OneNetwork, _RoundTrip, _Guidance):
    """A PeRFlow student (docs/methods.md, PeRFlow): one network of the architecture `model` (sorted JSON)
    whose prediction at (x, t) in window [s, e] = [w / K, (w + 1) / K) (K = `windows`) is the velocity
    of the window's straight line, directly (`parameterization` 'velocity') or through an eps
    prediction ('ddim_eps', 'diff_eps': `windows.eps_velocity` with the window's (lam, eta) of the
    teacher's `process`, a VP one).

    Sampling spreads N steps of `sampler` over the K windows (N raised to K if smaller, the remainder
    to the first windows; `windows.split_steps`), evenly spaced inside each, and solves each window
    on its own from s to e with that window's velocity, so every boundary w / K is hit exactly; the
    NFE is the sum of the windows' (N for euler@N, N >= K). rk45 runs adaptively per window.
    Sampling starts at t = 0 whatever eps (the windows tile [0, 1]); inversion walks the windows
    backwards from 1 to 0 with the same steps. caf@N, ddim@N and EDM grids do not apply (`supports`).
    """

    name: ClassVar[str] = 'piecewise'
    model: str
    windows: int = 4
    parameterization: str = 'velocity'
    process: diffusion.Process = diffusion.Linear()
    guidance: float = 1.0

    def __post_init__(self):
        if isinstance(self.windows, bool) or not isinstance(self.windows, int) or self.windows < 1:
            raise ValueError(f'piecewise kind: windows={self.windows!r}: must be an integer >= 1')
        if self.parameterization not in windows_lib.PARAMETERIZATIONS:
            raise ValueError(f'piecewise kind: parameterization={self.parameterization!r}: expected one of '
                             f"{', '.join(windows_lib.PARAMETERIZATIONS)}")
        if self.parameterization in windows_lib.EPS_PARAMETERIZATIONS and not isinstance(self.process, diffusion.VP):
            raise ValueError(f'piecewise kind: parameterization={self.parameterization!r} needs a VP process, got '
                             f'{self.process.name!r}')

    @classmethod
    def from_export_meta(cls, meta: dict) -> 'Piecewise':
        """The kind an export's meta.json records (`meta`)."""
        return cls.from_model_config(meta['model'], windows=int(meta['windows']),
                                     parameterization=meta['parameterization'],
                                     process=diffusion.from_meta(meta['process']))

    # The windows.
    def window_coefficients(self, s: solvers.Time, e: solvers.Time) -> tuple[jax.Array, jax.Array]:
        """(lam, eta) of window [s, e] for an eps parameterisation (z_e = lam z_s + eta eps)."""
        return windows_lib.coefficients(self.parameterization, self.process, s, e)

    def target(self, z_s: jax.Array, z_e: jax.Array, s: jax.Array, e: jax.Array) -> jax.Array:
        """The training target of the line from z_s (at s) to z_e (at e): its velocity, or eps* for an eps
        parameterisation (the same at every t of the window)."""
        if self.parameterization == 'velocity':
            return windows_lib.line_velocity(z_s, z_e, s, e)
        return windows_lib.eps_target(z_s, z_e, *self.window_coefficients(s, e))

    def window_velocity(self, params: Any, s: float, e: float, label: jax.Array | None = None) -> Velocity:
        """v(x, t) on window [s, e]: the network's prediction read as the window line's velocity."""
        predict = self.network(self.apply, params, label)
        if self.parameterization == 'velocity':
            return predict
        lam, eta = self.window_coefficients(s, e)
        return lambda x, t: windows_lib.eps_velocity(x, predict(x, t), t, s, e, lam, eta)

    def window_steps(self, sampler: Any) -> tuple[int, ...] | None:
        """The steps of each window (`windows.split_steps` of the sampler's N), None for adaptive rk45."""
        steps = getattr(sampler, 'steps', None)
        return None if steps is None else windows_lib.split_steps(steps, self.windows)

    def _solve(self, params: Any, x: jax.Array, sampler: Any, label: jax.Array | None,
               inverse: bool) -> tuple[jax.Array, jax.Array]:
        """Every window solved on its own, noise to data (or backwards); (x at the far end, summed nfe)."""
        steps, spans = self.window_steps(sampler), windows_lib.bounds(self.windows)
        nfe = jnp.zeros((), jnp.int32)
        for w in reversed(range(self.windows)) if inverse else range(self.windows):
            s, e = spans[w]
            part = sampler if steps is None else dataclasses.replace(sampler, steps=steps[w])
            x, n = solvers.solve(self.window_velocity(params, s, e, label), x, part, t0=e if inverse else s,
                                 t1=s if inverse else e)
            nfe = nfe + n
        return x, nfe * self.calls

    def sample(self, params: Any, x0: jax.Array, sampler: solvers.Sampler, *, eps: float,
               label: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Noise x0 at t = 0 (eps unused) -> data, window by window; (x1, nfe)."""
        del eps
        return self._solve(params, x0, sampler, label, inverse=False)

    def invert(self, params: Any, x1: jax.Array, sampler: solvers.Sampler, *, eps: float,
               label: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Data x1 -> noise at t = 0, the windows walked backwards; (x0, nfe)."""
        del eps
        return self._solve(params, x1, sampler, label, inverse=True)

    def path(self, params: Any, x0: jax.Array, steps: int, *, eps: float,
             label: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(xs, vs): the Euler path from 0 to 1, `steps` spread over the windows as in sampling, each
        window's steps with its own velocity; xs has one row per step and the start."""
        del eps
        xs, vs = [x0[None]], []
        for (s, e), n in zip(windows_lib.bounds(self.windows), windows_lib.split_steps(steps, self.windows)):
            part_x, part_v = solvers.trajectory(self.window_velocity(params, s, e, label), xs[-1][-1], steps=n,
                                                t0=s, t1=e)
            xs.append(part_x[1:])
            vs.append(part_v)
        return jnp.concatenate(xs, axis=0), jnp.concatenate(vs, axis=0)

    def start(self, eps: float) -> float:
        """The windows tile [0, 1]: solves start at t = 0."""
        return 0.0

    def supports(self, sampler: solvers.Sampler) -> bool:
        """Fixed-step euler, heun, midpoint, fireflow, rf_solver on the uniform or a shifted grid (N spread over
        the windows; a shifted grid is shifted in each window) and rk45
        (adaptive per window); not caf@N (a CAF model's), ddim@N (a diffusion model's) nor EDM grids."""
        return (getattr(sampler, 'name', None) not in ('caf', 'ddim')
                and not isinstance(getattr(sampler, 'grid', None), solvers.EdmGrid))

    def meta(self) -> dict:
        """What an export's meta.json records of the kind."""
        return {'kind': self.name, 'model': json.loads(self.model), 'windows': self.windows,
                'parameterization': self.parameterization, 'process': self.process.meta()}


# ---------------------------------------------------------------------------------------------------------------


KINDS = {VelocityField.name: VelocityField, Diffusion.name: Diffusion, ConstantAcceleration.name: ConstantAcceleration,
         Piecewise.name: Piecewise}  # meta 'kind' -> class
Kind = VelocityField | VelocityFunction | Diffusion | ConstantAcceleration | Piecewise


def _jsonable(data: dict) -> dict:
    return json.loads(json.dumps(data, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def from_config(config: ml_collections.ConfigDict) -> Kind:
    """The kind a training config builds: the velocity field of `config.model` (a bad model is a
    one-line ConfigError)."""
    kind = VelocityField.from_model_config(config.model)
    kind.module  # noqa: B018 - builds the network now: an unknown model or field fails here
    return kind


def from_meta(meta: dict, where: str = 'export') -> Kind:
    """The kind of an export's meta.json; meta without 'kind' (written before kinds) is a velocity field."""
    name = meta.get('kind', VelocityField.name)
    if name not in KINDS:
        raise errors.UserError(f"{where}: model kind {name!r} is unknown (expected one of {', '.join(KINDS)})")
    if name == ConstantAcceleration.name:
        return ConstantAcceleration.from_model_config(meta['model'], channels=meta['channels'], h=meta['h'],
                                                      ivc=meta['ivc'])
    if name == Diffusion.name:
        return Diffusion.from_model_config(meta['model'], schedule=meta['schedule'], timesteps=int(meta['timesteps']))
    if name == Piecewise.name:
        return Piecewise.from_export_meta(meta)
    return KINDS[name].from_model_config(meta['model'])


@dataclasses.dataclass(frozen=True)
class Model:
    """A trained model: its kind, parameters and the export's meta.json."""

    kind: Kind
    params: Any
    meta: dict = dataclasses.field(default_factory=dict, compare=False)


def as_model(entry: 'Model | tuple') -> Model:
    """A Model from a Model or an `(apply, params[, num_classes])` tuple (a velocity function)."""
    if isinstance(entry, Model):
        return entry
    apply, params, *classes = entry
    return Model(VelocityFunction(apply, classes[0] if classes else 0), params)
