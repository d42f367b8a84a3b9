"""Toy 2D distributions, sampled on device from a key (no files, no downloads).

Each distribution is `fn(key, n, **params) -> (n, 2) float32`. A config names one by
`name` and may set its parameters, e.g. `{'name': 'gmm', 'modes': 6, 'radius': 3.0}`.
"""

import functools
import inspect
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flowjax import errors


def normal(key, n, *, std=1.0):
    """Isotropic Gaussian N(0, std^2 I)."""
    return std * jax.random.normal(key, (n, 2), jnp.float32)


def gmm(key, n, *, modes=8, radius=4.0, std=0.5):
    """Equal-weight Gaussian mixture with `modes` components on a circle of `radius`."""
    k_mode, k_noise = jax.random.split(key)
    angle = 2 * math.pi * jax.random.randint(k_mode, (n,), 0, modes) / modes
    centers = radius * jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)
    return centers + std * jax.random.normal(k_noise, (n, 2), jnp.float32)


def eight_gaussians(key, n, *, radius=4.0, std=0.5):
    """The classic 8-mode ring."""
    return gmm(key, n, modes=8, radius=radius, std=std)


def moons(key, n, *, noise=0.1, scale=2.0):
    """Two interleaved half circles, centred and scaled to about [-3, 3] x [-1.5, 1.5]."""
    k_side, k_angle, k_noise = jax.random.split(key, 3)
    theta = math.pi * jax.random.uniform(k_angle, (n,))
    upper = jax.random.bernoulli(k_side, 0.5, (n,))
    x = jnp.where(upper, jnp.cos(theta), 1.0 - jnp.cos(theta)) - 0.5
    y = jnp.where(upper, jnp.sin(theta), 0.5 - jnp.sin(theta)) - 0.25
    pts = scale * jnp.stack([x, y], axis=-1)
    return pts + noise * jax.random.normal(k_noise, (n, 2), jnp.float32)


def checkerboard(key, n, *, cells=4, size=8.0):
    """Uniform on the dark squares of a `cells` x `cells` board of side `size`, centred at 0."""
    k_cell, k_pos = jax.random.split(key)
    # Pick a dark square (row + col even) uniformly, then a uniform point inside it.
    idx = jax.random.randint(k_cell, (n,), 0, cells * cells // 2)
    row = idx // (cells // 2)
    col = 2 * (idx % (cells // 2)) + row % 2
    offset = jax.random.uniform(k_pos, (n, 2))
    cell = size / cells
    return (jnp.stack([col, row], axis=-1) + offset) * cell - size / 2


def spirals(key, n, *, turns=1.5, noise=0.2, scale=4.0):
    """Two interleaved spiral arms."""
    k_arm, k_r, k_noise = jax.random.split(key, 3)
    r = jnp.sqrt(jax.random.uniform(k_r, (n,)))
    angle = 2 * math.pi * turns * r
    sign = jnp.where(jax.random.bernoulli(k_arm, 0.5, (n,)), 1.0, -1.0)
    pts = scale * sign[:, None] * jnp.stack([r * jnp.cos(angle), r * jnp.sin(angle)], axis=-1)
    return pts + noise * jax.random.normal(k_noise, (n, 2), jnp.float32)


DISTRIBUTIONS: dict[str, Callable[..., jax.Array]] = {
    'normal': normal,
    'gmm': gmm,
    '8gaussians': eight_gaussians,
    'moons': moons,
    'checkerboard': checkerboard,
    'spirals': spirals,
}


def distribution(spec: ml_collections.ConfigDict, field: str) -> Callable[[jax.Array, int], jax.Array]:
    """The sampler `(key, n) -> (n, 2)` a config spec names; `field` names the spec in errors."""
    params = dict(spec)
    name = params.pop('name', None)
    if name not in DISTRIBUTIONS:
        raise errors.ConfigError(
            f"{field}.name: unknown distribution {name!r} (expected one of {', '.join(DISTRIBUTIONS)})")
    fn = DISTRIBUTIONS[name]
    allowed = [p for p in inspect.signature(fn).parameters if p not in ('key', 'n')]
    for p in params:
        if p not in allowed:
            raise errors.ConfigError(f'{field}.{p}: not a parameter of {name!r} (it takes {", ".join(allowed)})')
    return functools.partial(fn, **params)


def check_config(config: ml_collections.ConfigDict) -> None:
    """`config.data` names toy-2D data whose target and source distributions exist."""
    if config.data.kind != 'toy2d':
        raise errors.ConfigError(
            f"data.kind={config.data.kind!r}: method {config.method!r} supports 'toy2d' in this version")
    distribution(config.data.target, 'data.target')
    distribution(config.data.source, 'data.source')


def source_sampler(spec: ml_collections.ConfigDict) -> Callable[[jax.Array, tuple[int, ...]], jax.Array]:
    """Noise x0 for a method's loss: `(key, shape) -> x0`, from `data.source`."""
    sample = distribution(spec, 'data.source')

    def draw(key, shape):
        return sample(key, shape[0]).reshape(shape)

    return draw


def sample(spec: ml_collections.ConfigDict, key: jax.Array, n: int, field: str = 'data.target') -> np.ndarray:
    """n points on the host, e.g. the held-out evaluation set."""
    return np.asarray(jax.jit(distribution(spec, field), static_argnums=1)(key, n))


def make_batches(spec: ml_collections.ConfigDict, mesh: Mesh, batch_size: int, seed: int, field: str = 'x1'):
    """`batches(step) -> {field: (batch_size, 2)}`: a global array sharded along 'data', drawn on device.

    Batch `step` depends only on (seed, step), so a resumed run sees the same data and so
    does a run on any number of devices.
    """
    draw = distribution(spec, 'data.target' if field == 'x1' else 'data.source')
    key = jax.random.fold_in(jax.random.key(seed), 0x7a11 if field == 'x1' else 0x50ce)
    sharding = NamedSharding(mesh, P('data'))

    @functools.partial(jax.jit, out_shardings={field: sharding})
    def batch_at(step):
        return {field: draw(jax.random.fold_in(key, step), batch_size)}

    return lambda step: batch_at(jnp.asarray(step, jnp.int32))
