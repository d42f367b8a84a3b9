"""Velocity networks, chosen by `config.model.name` through an explicit table."""

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
    kwargs = config.to_dict()
    name = kwargs.pop('name')
    if name not in MODELS:
        raise errors.ConfigError(f"model.name: unknown model {name!r} (expected one of {', '.join(MODELS)})")
    try:
        return MODELS[name](**kwargs)
    except TypeError as e:
        raise errors.ConfigError(f'model: {e}') from None


def apply_fn(module: nn.Module) -> Callable[..., jax.Array]:
    """The pure velocity `apply(params, x, t, dropout_rng=None)`; train mode when a dropout rng is given."""

    def apply(params, x, t, dropout_rng=None):
        if dropout_rng is None:
            return module.apply(params, x, t)
        return module.apply(params, x, t, train=True, rngs={'dropout': dropout_rng})

    return apply
