"""Training objectives. Each method module has a pure `loss_fn(params, batch, rng, ctx)` and a
`run(config, workdir)` that main dispatches to."""

import dataclasses
from collections.abc import Callable

import jax


@dataclasses.dataclass(frozen=True)
class Context:
    """What a loss needs besides params, batch and rng; closed over by the jitted step."""

    apply: Callable[..., jax.Array]  # apply(params, x, t, dropout_rng=None) -> velocity
    source: Callable[[jax.Array, tuple[int, ...]], jax.Array]  # (key, shape) -> noise x0
    t_eps: float = 1e-3
