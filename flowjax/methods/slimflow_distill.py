"""SlimFlow's flow-guided distillation (docs/methods.md, SlimFlow), method `slimflow_distill`: the
student and a frozen teacher both start from the annealed student's export (`slimflow_reflow`);
the student learns one-step generation on the couplings, guided by the teacher's 2-step
predictions from fresh noise.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from flowjax import errors
from flowjax.flows import paths
from flowjax.methods import method, slimflow_reflow, training


def defaults() -> ml_collections.ConfigDict:
    """`config.slimflow_distill`: loss D(x0 + v(x0), x1) + guidance * L_2step with t' ~ U[t_range];
    D is the flow's sample loss, `flow.loss` ('lpips' with lpips.resize = 64 in the paper)."""
    c = ml_collections.ConfigDict()
    c.couplings = config_dict.placeholder(str)
    c.init = config_dict.placeholder(str)
    c.guidance = 1.0  # lambda, the weight of the 2-step term; 0: plain one-step distillation
    c.t_range = (0.2, 0.8)
    c.flip_pairs = config_dict.placeholder(bool)
    return c


@dataclasses.dataclass(frozen=True)
class Options:
    guidance: float
    t_range: tuple[float, float]


def guided_loss_fn(params, batch: dict, rng: jax.Array, ctx: training.Context):
    """Flow-guided distillation: `L_d + guidance * L_2step`.

    L_d = D(x0 + v_s(x0, eps), x1) on the stored pairs. From fresh noise z and t' ~ U[lo, hi]:
    v = v_s(z, eps), x_t' = z + t' stopgrad(v), x_hat = x_t' + (1 - t') v_T(x_t', t') with the frozen
    teacher, L_2step = D(z + v, stopgrad(x_hat)). Both student calls run as one batch of 2B, and so do
    both distances.
    """
    x0, x1, label = batch['x0'], batch['x1'], ctx.label(batch)
    o = ctx.options
    guidance, (t_lo, t_hi) = o.guidance, o.t_range
    k_z, k_t, k_drop = jax.random.split(rng, 3)
    n = x0.shape[0]
    if guidance == 0:
        v = ctx.apply(params, x0, jnp.full((n,), ctx.t_eps), k_drop, label=label)
        loss, metrics = ctx.flow.sample_loss(x0 + v, x1, perceptual=ctx.distance_fn())
        return loss, {**metrics, 'loss_distill': loss}
    z = ctx.source(k_z, x0.shape)
    starts = jnp.concatenate([x0, z])
    labels = None if label is None else jnp.concatenate([label, label])
    v = ctx.apply(params, starts, jnp.full((2 * n,), ctx.t_eps), k_drop, label=labels)
    v_z = v[n:]
    t = jax.random.uniform(k_t, (n,), minval=t_lo, maxval=t_hi)
    x_t = z + paths.broadcast_time(t, z) * jax.lax.stop_gradient(v_z)
    x_hat = x_t + paths.broadcast_time(1.0 - t, z) * ctx.teacher_apply(ctx.teacher_params, x_t, t, label=label)
    d = ctx.flow.sample_distances(starts + v, jnp.concatenate([x1, jax.lax.stop_gradient(x_hat)]),
                                  perceptual=ctx.distance_fn())
    loss_distill, loss_2step = jnp.mean(d[:n]), jnp.mean(d[n:])
    return loss_distill + guidance * loss_2step, {'loss_distill': loss_distill, 'loss_2step': loss_2step}


def check(config: ml_collections.ConfigDict) -> Options:
    """Static checks of `slimflow_distill`."""
    slimflow_reflow.check_couplings(config, 'slimflow_distill')
    cfg = config.slimflow_distill
    if not cfg.init:
        raise errors.ConfigError('slimflow_distill.init: the annealed student (export or stage) is required; '
                                 'the student and its frozen teacher both start from it')
    if isinstance(cfg.guidance, bool) or not isinstance(cfg.guidance, (int, float)) or cfg.guidance < 0:
        raise errors.ConfigError(f'slimflow_distill.guidance={cfg.guidance!r}: must be a number >= 0')
    t_range = tuple(cfg.t_range)
    if len(t_range) != 2 or not 0.0 <= t_range[0] <= t_range[1] <= 1.0:
        raise errors.ConfigError(f'slimflow_distill.t_range={t_range}: expected (lo, hi) with 0 <= lo <= hi <= 1')
    return Options(guidance=float(cfg.guidance), t_range=(float(t_range[0]), float(t_range[1])))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Method 'slimflow_distill': flow-guided one-step distillation of the annealed student."""
    options = check(config)
    cfg = config.slimflow_distill
    init = training.load_model(cfg.init, 'slimflow_distill.init', config)
    return training.fit(config, workdir, METHOD, loss_fn=guided_loss_fn,
                        batches=slimflow_reflow.pair_batches(config, 'slimflow_distill'),
                        init_params=init.params, options=options, teacher=init)


METHOD = method.Method(name='slimflow_distill', run=run, check=check, section=defaults,
                       references=('slimflow_distill.couplings', 'slimflow_distill.init'))
