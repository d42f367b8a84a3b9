"""Reflow (k-RF): the rectified-flow loss on a teacher's couplings, stored or solved per batch."""

import dataclasses
import math

import jax
import ml_collections
from ml_collections import config_dict

from flowjax import errors
from flowjax.data import couplings, datasets
from flowjax.flows import solvers
from flowjax.methods import method, rf, training


def defaults() -> ml_collections.ConfigDict:
    """`config.reflow`: students trained on stored couplings, or on pairs solved per batch."""
    c = ml_collections.ConfigDict()
    c.couplings = config_dict.placeholder(str)  # coupling store dir, or a stage name
    c.mix_couplings = config_dict.placeholder(str)  # a second store (dir or stage name) mixed into every batch
    c.mix_fraction = 0.0  # its share f of each batch: floor(f * train.batch_size + 1/2) pairs; 0: unused
    c.init = config_dict.placeholder(str)  # export (or stage) to start from; None: fresh
    c.online_teacher = config_dict.placeholder(str)  # set: pairs solved per batch instead
    c.online_sampler = 'euler@32'
    return c


def online_loss_fn(params, batch: dict, rng: jax.Array, ctx: training.Context):
    """Pairs made on the fly: fresh noise x0, x1 = the teacher's solve of x0 through its kind (no gradient)."""
    x0, label = batch['x0'], ctx.label(batch)
    x1, _ = ctx.teacher_kind.sample(ctx.teacher_params, x0, ctx.options.online, eps=ctx.t_eps, label=label)
    pairs = {'x0': x0, 'x1': jax.lax.stop_gradient(x1)}
    return rf.loss_fn(params, pairs if label is None else {**pairs, 'label': label}, rng, ctx)


def mix_rows(config: ml_collections.ConfigDict) -> int:
    """m, the pairs of every batch read from `reflow.mix_couplings`: m = floor(f B + 1/2) for
    f = `reflow.mix_fraction` and B = `train.batch_size`, the same for any device count; 0 when f = 0
    (docs/methods.md, Reflow (k-RF)). One-line ConfigErrors for a bad f or a second store without one."""
    cfg, batch = config.reflow, config.train.batch_size
    f = cfg.mix_fraction
    if isinstance(f, bool) or not isinstance(f, int | float) or not 0.0 <= f <= 1.0:
        raise errors.ConfigError(f'reflow.mix_fraction={f!r}: must be a number in [0, 1]')
    if not f:
        if cfg.mix_couplings:
            raise errors.ConfigError(f'reflow.mix_couplings={cfg.mix_couplings!r}: set reflow.mix_fraction in (0, 1], '
                                     'the share of each batch drawn from it')
        return 0
    if not cfg.mix_couplings:
        raise errors.ConfigError(f'reflow.mix_fraction={f!r}: needs reflow.mix_couplings (a second coupling store '
                                 'directory or stage name)')
    rows = math.floor(f * batch + 0.5)
    if rows == 0 or (rows == batch and f < 1.0):
        raise errors.ConfigError(f'reflow.mix_fraction={f!r}: gives {rows} of train.batch_size={batch} pairs per '
                                 'batch from reflow.mix_couplings, leaving one store unused; use 0, 1 or a fraction '
                                 'that rounds to a count between')
    return rows


@dataclasses.dataclass(frozen=True)
class Options:
    online: solvers.Sampler | None  # the sampler of pairs solved per batch; None: stored pairs
    mix_rows: int  # pairs of every batch from reflow.mix_couplings (`mix_rows`)


def check(config: ml_collections.ConfigDict) -> Options:
    """Static checks; returns the online sampler (pairs solved per batch) and the mixed rows."""
    training.check_training(config)
    cfg = config.reflow
    mixed = mix_rows(config)
    if cfg.online_teacher:
        if mixed:
            raise errors.ConfigError('reflow.mix_couplings and reflow.online_teacher: mixed stores need stored '
                                     'pairs, not online ones')
        if cfg.couplings:
            raise errors.ConfigError('reflow.couplings and reflow.online_teacher: set one, not both')
        try:
            sampler = solvers.parse_sampler(cfg.online_sampler)
        except ValueError as e:
            raise errors.ConfigError(f'reflow.online_sampler: {e}') from None
        if sampler.name == 'rk45':
            raise errors.ConfigError('reflow.online_sampler: online pairs need a fixed-step sampler (e.g. euler@32)')
        return Options(online=sampler, mix_rows=0)
    if not cfg.couplings:
        raise errors.ConfigError('reflow.couplings: a coupling store directory (or stage name) is required')
    return Options(online=None, mix_rows=mixed)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config.model` on couplings, starting from `reflow.init` (an export) or fresh."""
    options = check(config)
    cfg = config.reflow
    init = training.load_model(cfg.init, 'reflow.init', config).params if cfg.init else None
    if options.online is not None:
        teacher = training.load_model(cfg.online_teacher, 'reflow.online_teacher')
        if not teacher.kind.supports(options.online):
            raise errors.ConfigError(f'reflow.online_sampler={cfg.online_sampler!r}: does not apply to the teacher '
                                     f'{cfg.online_teacher}, a model of kind {teacher.kind.name!r}')

        def noise(mesh):
            return datasets.make_noise_batches(config, mesh, config.train.batch_size, config.seed)

        return training.fit(config, workdir, METHOD, loss_fn=online_loss_fn, batches=noise, init_params=init,
                            options=options, teacher=teacher)

    def batches(mesh):
        expect = {'shape': list(datasets.sample_shape(config))}
        if options.mix_rows:
            return couplings.make_mixed_batches(cfg.couplings, cfg.mix_couplings, options.mix_rows, mesh,
                                                config.train.batch_size, config.seed, expect=expect)
        return couplings.make_batches(cfg.couplings, mesh, config.train.batch_size, config.seed, expect=expect)

    return training.fit(config, workdir, METHOD, loss_fn=rf.loss_fn, batches=batches, init_params=init)


METHOD = method.Method(name='reflow', run=run, check=check, section=defaults,
                       references=('reflow.couplings', 'reflow.mix_couplings', 'reflow.init', 'reflow.online_teacher'))
