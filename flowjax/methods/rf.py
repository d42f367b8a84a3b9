"""1-rectified flow: independent coupling, linear path, the flow's loss (default L2) on the
velocity x1 - x0 (docs/methods.md, Rectified flow (1-RF))."""

import jax
import ml_collections
from ml_collections import config_dict

from flowjax import errors
from flowjax.data import datasets
from flowjax.flows import paths
from flowjax.methods import method, training


def loss_fn(params, batch: dict, rng: jax.Array, ctx: training.Context):
    """t from the flow's time distribution, x_t = (1 - t) x0 + t x1, the flow's loss on
    v(x_t, t) against x1 - x0 (default: t ~ U[eps, 1] and mean (v - (x1 - x0))^2).

    x0 is the batch's (a stored coupling) when present, else fresh noise (independent coupling).
    """
    x1 = batch['x1']
    k_t, k_x0, k_drop = jax.random.split(rng, 3)
    x0 = batch['x0'] if 'x0' in batch else ctx.source(k_x0, x1.shape)
    t = ctx.flow.sample_t(k_t, x1.shape[0])
    x_t = paths.linear(x0, x1, t)
    v = ctx.apply(params, x_t, t, k_drop, label=ctx.label(batch))
    return ctx.flow.velocity_loss(v, paths.linear_velocity(x0, x1), x_t=x_t, t=t, x1=x1,
                                  perceptual=ctx.distance_fn())


def defaults() -> ml_collections.ConfigDict:
    """`config.rf`: fine-tuning from an export (docs/methods.md, Rectified flow (1-RF))."""
    c = ml_collections.ConfigDict()
    # an export (or stage) whose weights start training, a velocity field of config.model's network
    # (fine-tuning, e.g. on a data.classes subset); None: fresh weights
    c.init = config_dict.placeholder(str)
    return c


def check(config: ml_collections.ConfigDict) -> None:
    """Static checks of the shared sections and `rf.init` (a non-empty path or stage name, or None)."""
    training.check_training(config)
    init = config.rf.get('init') if 'rf' in config else None
    if init is not None and (not isinstance(init, str) or not init):
        raise errors.ConfigError(f'rf.init={init!r}: expected an export directory or stage name, or None (fresh)')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains a 1-RF model on `config.data` from fresh weights or `rf.init`'s, exports its EMA
    weights, evaluates them."""
    check(config)
    init = config.rf.get('init') if 'rf' in config else None
    params = training.load_model(init, 'rf.init', config).params if init else None

    def batches(mesh):
        return datasets.make_batches(config, mesh, config.train.batch_size, config.seed)

    return training.fit(config, workdir, METHOD, loss_fn=loss_fn, batches=batches, init_params=params)


METHOD = method.Method(name='rf', run=run, check=check, section=defaults, references=('rf.init',))
