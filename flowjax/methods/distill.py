"""Distillation of a flow into k steps on its couplings (k = 1: one step from noise)."""

import jax
import jax.numpy as jnp
import ml_collections

from flowjax import errors, methods
from flowjax.data import couplings, datasets
from flowjax.flows import paths


def loss_fn(params, batch: dict, rng: jax.Array, ctx: methods.Context):
    """Predict x1 in one jump from a grid time t = i / k of the coupling's straight line.

    i = 0 starts at the noise x0 itself with the network's time eps (for k = 1 this is
    `x0 + v(x0, eps)` against x1); i > 0 starts at x_t = (1 - t) x0 + t x1 and jumps (1 - t) v.
    """
    x0, x1 = batch['x0'], batch['x1']
    k, distance, c = ctx.options
    k_i, k_drop = jax.random.split(rng)
    i = jax.random.randint(k_i, (x0.shape[0],), 0, k) if k > 1 else jnp.zeros((x0.shape[0],), jnp.int32)
    t = i.astype(jnp.float32) / k
    x_t = paths.linear(x0, x1, t)
    v = ctx.apply(params, x_t, jnp.maximum(t, ctx.t_eps), k_drop, label=ctx.label(batch))
    x1_hat = x_t + paths.broadcast_time(1.0 - t, x_t) * v
    return jnp.mean(ctx.distance(distance, x1_hat, x1, c)), {}


def check(config: ml_collections.ConfigDict) -> None:
    methods.check_training(config)
    cfg = config.distill
    if not isinstance(cfg.k, int) or cfg.k < 1:
        raise errors.ConfigError(f'distill.k={cfg.k}: must be an integer >= 1')
    methods.check_distance(config, 'distill.loss')
    if not cfg.couplings:
        raise errors.ConfigError('distill.couplings: a coupling store directory (or stage name) is required')
    if not cfg.init:
        raise errors.ConfigError('distill.init: the export (or stage) the student starts from is required')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config.model`, initialised from `distill.init`, to k-step generation on couplings."""
    check(config)
    cfg = config.distill
    init = methods.load_model(cfg.init, 'distill.init', config)[1]

    def batches(mesh):
        return couplings.make_batches(cfg.couplings, mesh, config.train.batch_size, config.seed,
                                      expect={'shape': list(datasets.sample_shape(config))})

    return methods.fit(config, workdir, loss_fn=loss_fn, batches=batches, init_params=init,
                       options=(cfg.k, cfg.loss, cfg.huber_c), perceptual=cfg.loss == 'lpips')
