"""Model kinds: a trained model is (kind, params, meta), and every consumer goes through the kind.

Training initialises parameters through `kind.init`, the export's meta.json records
`kind.meta()` ('kind' and its network configs), and loading, evaluation, coupling generation and
inversion sample through `kind.sample` / `kind.invert` with a solver. No consumer asks which
method trained a model, so any kind can be a teacher.

    velocity   one network v(x, t[, label]): rectified flow, reflow, distillation, SlimFlow
               students (the kind of every export written before kinds existed)

A kind is a frozen, hashable dataclass (it keys jit caches). Later kinds add their own fields
and updates behind the same interface: CAF a velocity and an acceleration network and its own
N-step update, PeRFlow windowed sampling, a diffusion teacher its eps network read as a velocity.
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
from flowjax.flows import solvers

Velocity = Callable[[jax.Array, jax.Array], jax.Array]


class _VelocityKind:
    """What every velocity-giving kind shares: sampling and inversion by integrating `apply`."""

    name: ClassVar[str] = 'velocity'
    num_classes: int
    apply: Callable[..., jax.Array]  # (params, x, t, dropout_rng=None, label=None) -> v

    def velocity(self, params: Any, label: jax.Array | None = None) -> Velocity:
        """v(x, t) of these params (class `label` (B,) for a class-conditional model)."""
        if label is None:
            return functools.partial(self.apply, params)
        return functools.partial(self.apply, params, label=label)

    def sample(self, params: Any, x0: jax.Array, sampler: solvers.Sampler, *, eps: float,
               label: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Noise x0 -> data: the ODE from t = eps to 1 with `sampler`; (x1, nfe)."""
        return solvers.sample(self.velocity(params, label), x0, sampler, eps=eps)

    def invert(self, params: Any, x1: jax.Array, sampler: solvers.Sampler, *, eps: float,
               label: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """Data x1 -> noise: the ODE from t = 1 to eps; (x0, nfe)."""
        return solvers.invert(self.velocity(params, label), x1, sampler, eps=eps)


@dataclasses.dataclass(frozen=True)
class VelocityField(_VelocityKind):
    """One network giving the velocity v(x, t[, label]); `model` is its config as sorted JSON."""

    model: str

    @classmethod
    def from_model_config(cls, config: ml_collections.ConfigDict | dict) -> 'VelocityField':
        data = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
        return cls(json.dumps(_jsonable(data), sort_keys=True))

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
    def apply(self) -> Callable[..., jax.Array]:
        """The training call `apply(params, x, t, dropout_rng=None, label=None)`."""
        return models.apply_fn(self.module)

    def init(self, key: jax.Array, sample_shape: tuple[int, ...]) -> Any:
        """Fresh parameters for examples of `sample_shape` (traceable: jit it with out_shardings)."""
        dummy = jnp.zeros((1, *sample_shape), jnp.float32)
        label = (jnp.zeros((1,), jnp.int32),) if self.num_classes else ()
        return self.module.init(key, dummy, jnp.zeros((1,), jnp.float32), *label)

    def meta(self) -> dict:
        """What an export's meta.json records of the kind."""
        return {'kind': self.name, 'model': json.loads(self.model)}


@dataclasses.dataclass(frozen=True)
class VelocityFunction(_VelocityKind):
    """A velocity given as a pure function `apply(params, x, t, dropout_rng=None, label=None)`
    rather than a network config: an analytic flow with a known solution, or a network built in
    code. It samples and inverts like a velocity field; it has no export meta."""

    apply: Callable[..., jax.Array]
    num_classes: int = 0


KINDS = {VelocityField.name: VelocityField}  # kind name in meta.json -> class
Kind = VelocityField | VelocityFunction


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
