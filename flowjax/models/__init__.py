"""Velocity networks, chosen by `config.model.name` through an explicit table."""

import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections

from flowjax import errors
from flowjax.models import mlp, ncsnpp

MODELS: dict[str, type[nn.Module]] = {
    'mlp': mlp.VelocityMLP,
    'ncsnpp': ncsnpp.NCSNpp,
}


def build(config: ml_collections.ConfigDict) -> nn.Module:
    """The module named by config.name, with the remaining fields as its arguments."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.to_dict().items()}  # hashable
    name = kwargs.pop('name')
    if name not in MODELS:
        raise errors.ConfigError(f"model.name: unknown model {name!r} (expected one of {', '.join(MODELS)})")
    try:
        module = MODELS[name](**kwargs)
    except TypeError as e:
        raise errors.ConfigError(f'model: {e}') from None
    try:
        getattr(module, 'check', lambda: None)()
    except ValueError as e:
        raise errors.ConfigError(f'model.{e}' if str(e).startswith('label_dropout') else f'model: {e}') from None
    return module


def defaults(name: str | None) -> dict:
    """The default of each field of the network `name` (the fields a config may leave out); {} for an unknown one."""
    module = MODELS.get(name)
    if module is None:
        return {}
    return {f.name: f.default for f in dataclasses.fields(module)
            if f.name not in ('parent', 'name') and f.default is not dataclasses.MISSING}


def num_classes(config: ml_collections.ConfigDict) -> int:
    """The classes a model is conditioned on (0: unconditional)."""
    return int(config.get('num_classes', 0) or 0)


def null_label(config: ml_collections.ConfigDict) -> int | None:
    """The class id of the null label of a model trained for classifier-free guidance (its num_classes),
    None when it has none (model.label_dropout unset or 0)."""
    return num_classes(config) if num_classes(config) and config.get('label_dropout', 0) else None


def apply_fn(module: nn.Module) -> Callable[..., jax.Array]:
    """The pure velocity `apply(params, x, t, dropout_rng=None, label=None)`.

    Train mode (dropout) when a dropout rng is given; `label` (B,) int32 for class-conditional models.
    Equal modules share one function, so jitted samplers keyed on it compile once per architecture.
    """
    try:
        return _shared_apply_fn(module)
    except TypeError:  # a module with unhashable fields gets its own
        return _make_apply_fn(module)


@functools.lru_cache(maxsize=16)
def _shared_apply_fn(module: nn.Module) -> Callable[..., jax.Array]:
    return _make_apply_fn(module)


def _make_apply_fn(module: nn.Module) -> Callable[..., jax.Array]:

    def apply(params, x, t, dropout_rng=None, label=None):
        extra = () if label is None else (label,)
        if dropout_rng is None:
            return module.apply(params, x, t, *extra)
        return module.apply(params, x, t, *extra, train=True, rngs={'dropout': dropout_rng})

    return apply
