"""SlimFlow (ALGORITHMS.md section 2): small one-step students from a teacher's couplings.

`slimflow_reflow` (annealing reflow) trains a small student from random initialisation with the
reflow loss, its stored noise mixed with fresh noise, `x0' = sqrt(1 - b^2) x0 + b eps`, `b`
annealed from 1 (independent coupling: 1-RF training) to 0 (the teacher's coupling).
`slimflow_distill` (flow-guided distillation) starts the student and a frozen teacher from that
annealed student's export and trains one-step generation on the couplings, guided by the
teacher's 2-step predictions from fresh noise. Image pairs are flipped in pairs (x0 with x1).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from flowjax import errors, methods
from flowjax.data import couplings, datasets
from flowjax.flows import paths, schedules
from flowjax.methods import rf


def annealed_loss_fn(params, batch: dict, rng: jax.Array, ctx: methods.Context):
    """The reflow loss on pairs (sqrt(1 - b^2) x0 + b eps, x1); b is the batch's 'beta' (B,).

    With b = 0 this is the reflow loss on the stored pairs, with b = 1 the 1-RF loss.
    """
    x0 = batch['x0']
    beta = paths.broadcast_time(batch['beta'], x0)
    k_eps, k_rf = jax.random.split(rng)
    mixed = jnp.sqrt(1.0 - jnp.square(beta)) * x0 + beta * ctx.source(k_eps, x0.shape)
    pairs = {'x0': mixed, 'x1': batch['x1'], **({'label': batch['label']} if ctx.conditional else {})}
    loss, metrics = rf.loss_fn(params, pairs, k_rf, ctx)
    return loss, {**metrics, 'beta': jnp.mean(batch['beta'])}


def guided_loss_fn(params, batch: dict, rng: jax.Array, ctx: methods.Context):
    """Flow-guided distillation: `L_d + guidance * L_2step`.

    L_d = D(x0 + v_s(x0, eps), x1) on the stored pairs. From fresh noise z and t' ~ U[lo, hi]:
    v = v_s(z, eps), x_t' = z + t' stopgrad(v), x_hat = x_t' + (1 - t') v_T(x_t', t') with the frozen
    teacher, L_2step = D(z + v, stopgrad(x_hat)). Both student calls run as one batch of 2B, and so do
    both distances.
    """
    x0, x1, label = batch['x0'], batch['x1'], ctx.label(batch)
    distance, c, guidance, (t_lo, t_hi) = ctx.options
    k_z, k_t, k_drop = jax.random.split(rng, 3)
    n = x0.shape[0]
    if guidance == 0:
        v = ctx.apply(params, x0, jnp.full((n,), ctx.t_eps), k_drop, label=label)
        loss = jnp.mean(ctx.distance(distance, x0 + v, x1, c))
        return loss, {'loss_distill': loss}
    z = ctx.source(k_z, x0.shape)
    starts = jnp.concatenate([x0, z])
    labels = None if label is None else jnp.concatenate([label, label])
    v = ctx.apply(params, starts, jnp.full((2 * n,), ctx.t_eps), k_drop, label=labels)
    v_z = v[n:]
    t = jax.random.uniform(k_t, (n,), minval=t_lo, maxval=t_hi)
    x_t = z + paths.broadcast_time(t, z) * jax.lax.stop_gradient(v_z)
    x_hat = x_t + paths.broadcast_time(1.0 - t, z) * ctx.teacher_apply(ctx.teacher_params, x_t, t, label=label)
    d = ctx.distance(distance, starts + v, jnp.concatenate([x1, jax.lax.stop_gradient(x_hat)]), c)
    loss_distill, loss_2step = jnp.mean(d[:n]), jnp.mean(d[n:])
    return loss_distill + guidance * loss_2step, {'loss_distill': loss_distill, 'loss_2step': loss_2step}


def flip_pairs(config: ml_collections.ConfigDict, field: str) -> bool:
    """`<field>` (None: on for images, off for toy data); on for toy data is a config error."""
    section, name = field.split('.')
    value = config[section][name]
    if value is None:
        return config.data.kind == 'image'
    if value and config.data.kind != 'image':
        raise errors.ConfigError(f'{field}=True: paired horizontal flips need data.kind=\'image\'')
    return bool(value)


def _check_couplings(config: ml_collections.ConfigDict, section: str) -> None:
    methods.check_training(config)
    if not config[section].couplings:
        raise errors.ConfigError(f'{section}.couplings: a coupling store directory (or stage name) is required')
    flip_pairs(config, f'{section}.flip_pairs')


def check_reflow(config: ml_collections.ConfigDict) -> schedules.Schedule:
    """Static checks of `slimflow_reflow`; returns the beta schedule."""
    _check_couplings(config, 'slimflow_reflow')
    if config.data.kind == 'toy2d' and config.data.source.to_dict() != {'name': 'normal'}:
        raise errors.ConfigError(f'data.source={config.data.source.to_dict()}: annealing reflow mixes in '
                                 "standard normal noise, so the couplings' noise must be {'name': 'normal'}")
    return schedules.from_config(config.slimflow_reflow.beta, 'slimflow_reflow.beta')


def check_distill(config: ml_collections.ConfigDict) -> None:
    """Static checks of `slimflow_distill`."""
    _check_couplings(config, 'slimflow_distill')
    cfg = config.slimflow_distill
    methods.check_distance(config, 'slimflow_distill.loss')
    if not cfg.init:
        raise errors.ConfigError('slimflow_distill.init: the annealed student (export or stage) is required; '
                                 'the student and its frozen teacher both start from it')
    if isinstance(cfg.guidance, bool) or not isinstance(cfg.guidance, (int, float)) or cfg.guidance < 0:
        raise errors.ConfigError(f'slimflow_distill.guidance={cfg.guidance!r}: must be a number >= 0')
    t_range = tuple(cfg.t_range)
    if len(t_range) != 2 or not 0.0 <= t_range[0] <= t_range[1] <= 1.0:
        raise errors.ConfigError(f'slimflow_distill.t_range={t_range}: expected (lo, hi) with 0 <= lo <= hi <= 1')


def _batches(config: ml_collections.ConfigDict, section: str, per_step=None):
    cfg = config[section]
    return functools.partial(couplings.make_batches, cfg.couplings, batch_size=config.train.batch_size,
                             seed=config.seed, expect={'shape': list(datasets.sample_shape(config))},
                             flip=flip_pairs(config, f'{section}.flip_pairs'), per_step=per_step)


def run_reflow(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Method 'slimflow_reflow': `config.model` from random init, annealing reflow on couplings."""
    beta = check_reflow(config)
    if beta.kind in ('linear', 'cosine') and beta.steps > config.train.steps:
        logging.warning('slimflow_reflow.beta.steps=%d > train.steps=%d: training ends before the couplings '
                        'are used unmixed (beta %.3f at the end)', beta.steps, config.train.steps,
                        beta(config.train.steps))
    return methods.fit(config, workdir, loss_fn=annealed_loss_fn,
                       batches=_batches(config, 'slimflow_reflow', per_step={'beta': beta}))


def run_distill(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Method 'slimflow_distill': flow-guided one-step distillation of the annealed student."""
    check_distill(config)
    cfg = config.slimflow_distill
    module, params, _ = methods.load_model(cfg.init, 'slimflow_distill.init', config)
    options = (cfg.loss, cfg.huber_c, float(cfg.guidance), tuple(float(t) for t in cfg.t_range))
    return methods.fit(config, workdir, loss_fn=guided_loss_fn, batches=_batches(config, 'slimflow_distill'),
                       init_params=params, options=options, teacher=(module, params),
                       perceptual=cfg.loss == 'lpips')
