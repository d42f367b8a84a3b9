"""The training objective that every method's loss reads from `config.flow`: the distribution
of the training time t and the loss on the velocity (or, for distillation, on the sample).

Time convention: t = 0 noise, t = 1 data, x_t = (1 - t) x0 + t x1, velocity target x1 - x0;
rfpp's noise level s is 1 - t (docs/methods.md, rfpp).

    flow.time       uniform | u_shaped | exp10 | logit_normal | grid   (`timesteps`)
    flow.loss       l2 | pseudo_huber | lpips_huber | lpips
    flow.normalize  per-sample weight 1 / stopgrad(L_i)               (docs/methods.md, Simple ReFlow)

The default (uniform time, l2, no normalisation) computes exactly what rectified flow always
did: `timesteps.uniform(rng, n, eps=t_eps)` and `mean(losses.per_example_l2(v, target))`.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from flowjax import errors
from flowjax.flows import losses, paths, timesteps

TIMES = ('uniform', 'u_shaped', 'exp10', 'logit_normal', 'grid')
LOSSES = ('l2', 'pseudo_huber', 'lpips_huber', 'lpips')
LPIPS_LOSSES = ('lpips_huber', 'lpips')
FIELDS = ('t_eps', 'time', 'u_shape_a', 'logit_mean', 'logit_std', 'grid_points', 'loss', 'huber_c',
          'lpips_t_min', 'normalize')

Perceptual = Callable[[jax.Array, jax.Array], jax.Array]  # (x, y) -> (B,) distances


def defaults() -> ml_collections.ConfigDict:
    """The `flow` config section with its defaults (the objective rectified flow always used)."""
    c = ml_collections.ConfigDict()
    c.t_eps = 1e-3  # in (0, 0.5): uniform's lower bound; sampling integrates from t_eps
    c.time = 'uniform'  # or 'u_shaped' (rfpp), 'exp10' (Simple ReFlow), 'logit_normal', 'grid' (CAF)
    c.u_shape_a = 4.0  # u_shaped: p(t) ~ cosh(a (t - 1/2)); > 0
    c.logit_mean = 0.0  # logit_normal: t = sigmoid(mean + std z)
    c.logit_std = 1.0  # > 0
    c.grid_points = 1000  # grid: t = k / grid_points, k in {0, ..., grid_points}
    c.loss = 'l2'  # or 'pseudo_huber', 'lpips_huber' (rfpp), 'lpips' (both need image data, see c.lpips)
    c.huber_c = config_dict.placeholder(float)  # None: 0.00054 * d; else > 0
    c.lpips_t_min = config_dict.placeholder(float)  # set, in (0, 1]: LPIPS term / max(1 - t, lpips_t_min)
    c.normalize = False  # per-sample loss normalisation 1 / stopgrad(L_i) (Simple ReFlow)
    return c


@dataclasses.dataclass(frozen=True)
class Flow:
    """The objective of `config.flow` (see `defaults`); hashable, so a jitted step takes it static."""

    t_eps: float = 1e-3
    time: str = 'uniform'
    u_shape_a: float = 4.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    grid_points: int = 1000
    loss: str = 'l2'
    huber_c: float | None = None
    lpips_t_min: float | None = None
    normalize: bool = False

    @property
    def uses_lpips(self) -> bool:
        """The loss needs a perceptual distance (`perceptual=`)."""
        return self.loss in LPIPS_LOSSES

    @property
    def is_default(self) -> bool:
        """The plain rectified-flow loss: l2 without normalisation (metrics {})."""
        return self.loss == 'l2' and not self.normalize

    def sample_t(self, rng: jax.Array, n: int) -> jax.Array:
        """n training times, shape (n,) float32, from `self.time`'s distribution."""
        return _SAMPLERS[self.time](self, rng, n)

    def velocity_loss(self, v: jax.Array, target: jax.Array, *, x_t: jax.Array, t: jax.Array, x1: jax.Array,
                      perceptual: Perceptual | None = None) -> tuple[jax.Array, dict]:
        """(scalar loss, metrics) of the predicted velocity v against `target` (x1 - x0) at x_t, t (B,).

        Per example, with H the pseudo-Huber distance (c = huber_c) and x1_hat = x_t + (1 - t) v
        the one-step estimate of the data:

            l2            mean_dims (v - target)^2
            pseudo_huber  H(v, target)
            lpips_huber   t H(v, target) + LPIPS(x1_hat, x1) [/ max(1 - t, lpips_t_min)]
                          (rfpp's (1 - s) H + LPIPS [/ s], s = 1 - t; docs/methods.md, rfpp)
            lpips         LPIPS(x1_hat, x1) [/ max(1 - t, lpips_t_min)]: LPIPS is a distance
                          between samples, so the velocity enters only through x1_hat

        The LPIPS term is divided only when lpips_t_min is set (the clamp keeps 1 / s finite).
        With `normalize` each per-example loss L_i becomes L_i / stopgrad(L_i) before the batch
        mean. Metrics: {} for the default; else 'loss_unweighted' (the batch mean of L_i before
        normalisation) and, for lpips_huber, 'loss_huber' and 'loss_lpips' (the batch means of the
        unweighted H and LPIPS distances).
        """
        if self.is_default:
            return jnp.mean(losses.per_example_l2(v, target)), {}
        x1_hat = x_t + paths.broadcast_time(1.0 - t, x_t) * v
        return self.field_loss(v, target, t=t, x1=x1, x1_hat=x1_hat, perceptual=perceptual, huber_weight=t)

    def field_loss(self, pred: jax.Array, target: jax.Array, *, t: jax.Array, x1: jax.Array, x1_hat: jax.Array,
                   perceptual: Perceptual | None = None,
                   huber_weight: jax.Array | float = 1.0) -> tuple[jax.Array, dict]:
        """(scalar loss, metrics) of a predicted field (a velocity, CAF's acceleration) against its
        target, with `x1_hat` the method's one-step estimate of the data x1 for the LPIPS losses:

            l2            mean_dims (pred - target)^2
            pseudo_huber  H(pred, target)
            lpips_huber   w H(pred, target) + LPIPS(x1_hat, x1) [/ max(1 - t, lpips_t_min)]
            lpips         LPIPS(x1_hat, x1) [/ max(1 - t, lpips_t_min)]

        w = `huber_weight` per example (B,) or a number: rfpp's velocity loss weighs H by t
        (`velocity_loss`), CAF's losses do not (w = 1). Normalisation and metrics as in `velocity_loss`.
        """
        if self.is_default:
            return jnp.mean(losses.per_example_l2(pred, target)), {}
        if self.loss == 'l2':
            return self._reduce(losses.per_example_l2(pred, target), {})
        if self.loss == 'pseudo_huber':
            return self._reduce(losses.per_example_pseudo_huber(pred, target, self.huber_c), {})
        lpips = self._perceptual(perceptual)(x1_hat, x1)
        weighted = lpips if self.lpips_t_min is None else lpips / jnp.maximum(1.0 - t, self.lpips_t_min)
        if self.loss == 'lpips':
            return self._reduce(weighted, {})
        huber = losses.per_example_pseudo_huber(pred, target, self.huber_c)
        return self._reduce(huber_weight * huber + weighted,
                            {'loss_huber': jnp.mean(huber), 'loss_lpips': jnp.mean(lpips)})

    def sample_loss(self, pred: jax.Array, target: jax.Array, *,
                    perceptual: Perceptual | None = None) -> tuple[jax.Array, dict]:
        """(scalar loss, metrics) of a predicted sample against its target (distillation: x1_hat vs x1).

        Per example: l2 mean_dims (pred - target)^2; pseudo_huber H(pred, target); lpips
        LPIPS(pred, target); lpips_huber H(pred, target) + LPIPS(pred, target) (no time weight and
        no lpips_t_min division: a sample has no t). `normalize` and the metrics as in
        `velocity_loss`; the default returns exactly mean(per_example_l2(pred, target)) and {}.
        """
        if self.is_default:
            return jnp.mean(losses.per_example_l2(pred, target)), {}
        per_example, metrics = self._sample_per_example(pred, target, perceptual)
        return self._reduce(per_example, metrics)

    def sample_distances(self, pred: jax.Array, target: jax.Array, *,
                         perceptual: Perceptual | None = None) -> jax.Array:
        """The per-example (B,) terms whose batch mean is `sample_loss` (normalised if `normalize`):
        for a method that averages parts of one batch separately (SlimFlow's two distillation terms)."""
        if self.is_default:
            return losses.per_example_l2(pred, target)
        per_example, _ = self._sample_per_example(pred, target, perceptual)
        return losses.normalized(per_example) if self.normalize else per_example

    def _sample_per_example(self, pred, target, perceptual) -> tuple[jax.Array, dict]:
        if self.loss == 'l2':
            return losses.per_example_l2(pred, target), {}
        if self.loss == 'pseudo_huber':
            return losses.per_example_pseudo_huber(pred, target, self.huber_c), {}
        lpips = self._perceptual(perceptual)(pred, target)
        if self.loss == 'lpips':
            return lpips, {}
        huber = losses.per_example_pseudo_huber(pred, target, self.huber_c)
        return huber + lpips, {'loss_huber': jnp.mean(huber), 'loss_lpips': jnp.mean(lpips)}

    def _perceptual(self, perceptual: Perceptual | None) -> Perceptual:
        if perceptual is None:
            raise ValueError(f"flow.loss={self.loss!r} needs perceptual=(x, y) -> (B,) distances")
        return perceptual

    def _reduce(self, per_example: jax.Array, metrics: dict) -> tuple[jax.Array, dict]:
        """The batch mean of per_example (normalised if `normalize`) and metrics + loss_unweighted."""
        weighted = losses.normalized(per_example) if self.normalize else per_example
        return jnp.mean(weighted), {'loss_unweighted': jnp.mean(per_example), **metrics}


_SAMPLERS = {
    'uniform': lambda f, rng, n: timesteps.uniform(rng, n, eps=f.t_eps),
    'u_shaped': lambda f, rng, n: timesteps.u_shaped(rng, n, a=f.u_shape_a),
    'exp10': lambda f, rng, n: timesteps.exp10(rng, n, eps=f.t_eps),
    'logit_normal': lambda f, rng, n: timesteps.logit_normal(rng, n, mean=f.logit_mean, std=f.logit_std,
                                                             eps=f.t_eps),
    'grid': lambda f, rng, n: timesteps.grid(rng, n, points=f.grid_points),
}


def _is_number(value) -> bool:
    """A finite real number (int or float, not bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _is_int(value) -> bool:
    """A Python int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


# (field, is the value valid, what a valid value is): checked in this order.
_CHECKS = (
    ('t_eps', lambda x: _is_number(x) and 0.0 < x < 0.5, 'must be a number in (0, 0.5)'),
    ('time', lambda x: isinstance(x, str) and x in TIMES, f"expected one of {', '.join(TIMES)}"),
    ('u_shape_a', lambda x: _is_number(x) and x > 0, 'must be a number > 0'),
    ('logit_mean', _is_number, 'must be a finite number'),
    ('logit_std', lambda x: _is_number(x) and x > 0, 'must be a number > 0'),
    ('grid_points', lambda x: _is_int(x) and x >= 1, 'must be an integer >= 1'),
    ('loss', lambda x: isinstance(x, str) and x in LOSSES, f"expected one of {', '.join(LOSSES)}"),
    ('huber_c', lambda x: x is None or (_is_number(x) and x > 0), 'must be None (0.00054 * d) or a number > 0'),
    ('lpips_t_min', lambda x: x is None or (_is_number(x) and 0 < x <= 1),
     'must be None (LPIPS term not divided) or a number in (0, 1]'),
    ('normalize', lambda x: isinstance(x, bool), 'must be True or False'),
)


def _optional_float(x) -> float | None:
    return None if x is None else float(x)


def from_config(cfg: ml_collections.ConfigDict, *, data_kind: str, field: str = 'flow') -> Flow:
    """The objective a `flow` section describes (missing fields take `defaults()`); a one-line
    ConfigError naming the field otherwise. The LPIPS losses need data_kind == 'image'."""
    unknown = sorted(set(cfg.keys()) - set(FIELDS))
    if unknown:
        raise errors.ConfigError(f"{field}.{unknown[0]}: unknown field (expected one of {', '.join(FIELDS)})")
    base = defaults()
    v = {name: cfg[name] if name in cfg else base[name] for name in FIELDS}
    for name, valid, expected in _CHECKS:
        if not valid(v[name]):
            raise errors.ConfigError(f'{field}.{name}={v[name]!r}: {expected}')
    if v['loss'] in LPIPS_LOSSES and data_kind != 'image':
        raise errors.ConfigError(f"{field}.loss={v['loss']!r}: LPIPS compares images, it needs data.kind='image' "
                                 f'(got {data_kind!r})')
    return Flow(t_eps=float(v['t_eps']), time=v['time'], u_shape_a=float(v['u_shape_a']),
                logit_mean=float(v['logit_mean']), logit_std=float(v['logit_std']), grid_points=v['grid_points'],
                loss=v['loss'], huber_c=_optional_float(v['huber_c']),
                lpips_t_min=_optional_float(v['lpips_t_min']), normalize=v['normalize'])
