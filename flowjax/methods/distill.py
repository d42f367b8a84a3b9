"""Distillation of a flow into k steps on its couplings (k = 1: one step from noise)."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from flowjax import errors
from flowjax.data import couplings, datasets
from flowjax.flows import paths
from flowjax.methods import method, training


def defaults() -> ml_collections.ConfigDict:
    """`config.distill`: a student initialised from `init`, trained on couplings to k steps."""
    c = ml_collections.ConfigDict()
    c.couplings = config_dict.placeholder(str)
    c.init = config_dict.placeholder(str)  # the student starts from this export (or stage)
    c.k = 1  # k = 1: one step from t = eps; k > 1: t on the grid {i / k}
    return c


@dataclasses.dataclass(frozen=True)
class Options:
    k: int


def loss_fn(params, batch: dict, rng: jax.Array, ctx: training.Context):
    """Predict x1 in one jump from a grid time t = i / k of the coupling's straight line.

    i = 0 starts at the noise x0 itself with the network's time eps (for k = 1 this is
    `x0 + v(x0, eps)` against x1); i > 0 starts at x_t = (1 - t) x0 + t x1 and jumps (1 - t) v.
    The distance is the flow's sample loss (`flow.loss`: l2, pseudo_huber, lpips, lpips_huber).
    """
    x0, x1 = batch['x0'], batch['x1']
    k = ctx.options.k
    k_i, k_drop = jax.random.split(rng)
    i = jax.random.randint(k_i, (x0.shape[0],), 0, k) if k > 1 else jnp.zeros((x0.shape[0],), jnp.int32)
    t = i.astype(jnp.float32) / k
    x_t = paths.linear(x0, x1, t)
    v = ctx.apply(params, x_t, jnp.maximum(t, ctx.t_eps), k_drop, label=ctx.label(batch))
    x1_hat = x_t + paths.broadcast_time(1.0 - t, x_t) * v
    return ctx.flow.sample_loss(x1_hat, x1, perceptual=ctx.distance_fn())


def check(config: ml_collections.ConfigDict) -> Options:
    training.check_training(config)
    cfg = config.distill
    if not isinstance(cfg.k, int) or cfg.k < 1:
        raise errors.ConfigError(f'distill.k={cfg.k}: must be an integer >= 1')
    if not cfg.couplings:
        raise errors.ConfigError('distill.couplings: a coupling store directory (or stage name) is required')
    if not cfg.init:
        raise errors.ConfigError('distill.init: the export (or stage) the student starts from is required')
    return Options(k=cfg.k)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config.model`, initialised from `distill.init`, to k-step generation on couplings."""
    options = check(config)
    cfg = config.distill
    init = training.load_model(cfg.init, 'distill.init', config).params

    def batches(mesh):
        return couplings.make_batches(cfg.couplings, mesh, config.train.batch_size, config.seed,
                                      expect={'shape': list(datasets.sample_shape(config))})

    return training.fit(config, workdir, METHOD, loss_fn=loss_fn, batches=batches, init_params=init,
                        options=options)


METHOD = method.Method(name='distill', run=run, check=check, section=defaults,
                       references=('distill.couplings', 'distill.init'))
