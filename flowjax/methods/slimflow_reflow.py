"""SlimFlow's annealing reflow (docs/methods.md, SlimFlow), method `slimflow_reflow`: a small student
from random initialisation trained with the reflow loss, its stored noise mixed with fresh noise,
`x0' = sqrt(1 - b^2) x0 + b eps`, `b` annealed from 1 (independent coupling: 1-RF training) to 0
(the teacher's coupling). Image pairs are flipped in pairs (x0 with x1). `slimflow_distill.py`
makes the annealed student one step.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from ml_collections import config_dict

from flowjax import errors
from flowjax.data import couplings, datasets
from flowjax.flows import paths, schedules
from flowjax.methods import method, rf, training


def defaults() -> ml_collections.ConfigDict:
    """`config.slimflow_reflow`: `model` (a small student) from random init on couplings whose noise
    is mixed, sqrt(1 - b^2) x0 + b eps, with b following `beta` (schedule linear / exponential /
    cosine over `steps` = W, or constant `value`)."""
    c = ml_collections.ConfigDict()
    c.couplings = config_dict.placeholder(str)
    c.beta = ml_collections.ConfigDict({'schedule': 'linear', 'steps': 300_000, 'value': 0.0})
    c.flip_pairs = config_dict.placeholder(bool)  # x0 and x1 flipped together; None: images on
    return c


def annealed_loss_fn(params, batch: dict, rng: jax.Array, ctx: training.Context):
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


def flip_pairs(config: ml_collections.ConfigDict, field: str) -> bool:
    """`<field>` (None: on for images, off for toy data); on for toy data is a config error."""
    section, name = field.split('.')
    value = config[section][name]
    if value is None:
        return config.data.kind == 'image'
    if value and config.data.kind != 'image':
        raise errors.ConfigError(f'{field}=True: paired horizontal flips need data.kind=\'image\'')
    return bool(value)


def check_couplings(config: ml_collections.ConfigDict, section: str) -> None:
    training.check_training(config)
    if not config[section].couplings:
        raise errors.ConfigError(f'{section}.couplings: a coupling store directory (or stage name) is required')
    flip_pairs(config, f'{section}.flip_pairs')


def check(config: ml_collections.ConfigDict) -> schedules.Schedule:
    """Static checks of `slimflow_reflow`; returns the beta schedule."""
    check_couplings(config, 'slimflow_reflow')
    if config.data.kind == 'toy2d' and config.data.source.to_dict() != {'name': 'normal'}:
        raise errors.ConfigError(f'data.source={config.data.source.to_dict()}: annealing reflow mixes in '
                                 "standard normal noise, so the couplings' noise must be {'name': 'normal'}")
    return schedules.from_config(config.slimflow_reflow.beta, 'slimflow_reflow.beta')


def pair_batches(config: ml_collections.ConfigDict, section: str, per_step=None):
    """`mesh -> (step -> batch)` of `<section>.couplings`, flipped in pairs as `<section>.flip_pairs` says."""
    cfg = config[section]
    return functools.partial(couplings.make_batches, cfg.couplings, batch_size=config.train.batch_size,
                             seed=config.seed, expect={'shape': list(datasets.sample_shape(config))},
                             flip=flip_pairs(config, f'{section}.flip_pairs'), per_step=per_step)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Method 'slimflow_reflow': `config.model` from random init, annealing reflow on couplings."""
    beta = check(config)
    if beta.kind in ('linear', 'cosine') and beta.steps > config.train.steps:
        logging.warning('slimflow_reflow.beta.steps=%d > train.steps=%d: training ends before the couplings '
                        'are used unmixed (beta %.3f at the end)', beta.steps, config.train.steps,
                        beta(config.train.steps))
    return training.fit(config, workdir, METHOD, loss_fn=annealed_loss_fn,
                        batches=pair_batches(config, 'slimflow_reflow', per_step={'beta': beta}))


METHOD = method.Method(name='slimflow_reflow', run=run, check=check, section=defaults,
                       references=('slimflow_reflow.couplings',))
