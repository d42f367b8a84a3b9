"""1-rectified flow: independent coupling, linear path, L2 on the velocity x1 - x0."""

import jax
import ml_collections
from etils import epath

from flowjax import errors, evaluate, models, sharding, train
from flowjax.data import toy2d
from flowjax.flows import losses, paths, timesteps
from flowjax.methods import Context


def loss_fn(params, batch: dict, rng: jax.Array, ctx: Context):
    """t ~ U[eps, 1], x_t = (1 - t) x0 + t x1, loss = mean (v(x_t, t) - (x1 - x0))^2."""
    x1 = batch['x1']
    k_t, k_x0, k_drop = jax.random.split(rng, 3)
    x0 = ctx.source(k_x0, x1.shape)
    t = timesteps.uniform(k_t, x1.shape[0], eps=ctx.t_eps)
    v = ctx.apply(params, paths.linear(x0, x1, t), t, k_drop)
    return losses.l2(v, paths.linear_velocity(x0, x1)), {}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains a 1-RF model on `config.data`, exports its EMA weights, evaluates them."""
    if config.data.kind != 'toy2d':
        raise errors.ConfigError(f"data.kind={config.data.kind!r}: method 'rf' supports 'toy2d' in this version")
    evaluate.parse_samplers(config)  # fail on a bad sampler before training, not after
    mesh = sharding.data_mesh()
    sharding.check_batch_size(config.train.batch_size, mesh)
    module = models.build(config.model)
    ctx = Context(apply=models.apply_fn(module), source=toy2d.source_sampler(config.data.source),
                  t_eps=config.flow.t_eps)
    batches = toy2d.make_batches(config.data.target, mesh, config.train.batch_size, config.seed)
    state = train.train(config, workdir, module=module, loss_fn=loss_fn, ctx=ctx, batches=batches,
                        sample_shape=(2,), mesh=mesh)
    name = config.name or config.method
    return evaluate.evaluate_toy(config, epath.Path(workdir), {name: (ctx.apply, state.ema_params)})
