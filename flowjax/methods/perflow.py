"""PeRFlow, piecewise rectified flow (docs/methods.md, PeRFlow): the student learns, on each of K time
windows, the straight line between the ends of the teacher's trajectory through that window.

Per batch of real data x1 and fresh noise eps (`data.source`: standard normal by default):

    t = k / D, k uniform in {0, ..., D - 1}        D = perflow.grid_points
    w = floor(k K / D), s = w / K, e = (w + 1) / K  K = perflow.windows
    z_s = teacher.process.marginal(x1, eps, s)      ((1 - s) eps + s x1 for a rectified-flow teacher)
    z_e = sg(teacher's solve of z_s from s to e)    perflow.teacher_sampler, steps per window
    z_t = z_s + (z_e - z_s) (t - s) / (e - s)
    loss = flow.field_loss(student(z_t, t), target) with target (z_e - z_s) / (e - s) ('velocity') or
           the eps* of the window's line ('ddim_eps', 'diff_eps': a VP teacher; flowjax/flows/windows.py)

The student starts from the teacher's weights (perflow.init None) or from perflow.init, and is exported
as a model of kind 'piecewise' (windowed sampling, `kinds.Piecewise`).
"""

import dataclasses

import jax
import ml_collections
from ml_collections import config_dict

from flowjax import errors
from flowjax.data import datasets
from flowjax.flows import diffusion, solvers, windows
from flowjax.methods import method, training
from flowjax.models import kinds


def defaults() -> ml_collections.ConfigDict:
    """`config.perflow` (docs/methods.md, PeRFlow)."""
    c = ml_collections.ConfigDict()
    c.teacher = config_dict.placeholder(str)  # the teacher's export (or stage name): a velocity field or ddpm; required
    c.windows = 4  # K windows [w / K, (w + 1) / K) of [0, 1]
    c.grid_points = 1000  # D: training times t = k / D, k in {0, ..., D - 1}; >= windows
    c.teacher_sampler = 'euler@8'  # the teacher's solve over one window (steps per window): fixed-step
    c.parameterization = 'velocity'  # or 'ddim_eps', 'diff_eps' (eps predictions; a VP (ddpm) teacher)
    c.init = config_dict.placeholder(str)  # export (or stage) the student starts from; None: the teacher's weights
    return c


@dataclasses.dataclass(frozen=True)
class Options:
    windows: int
    grid_points: int
    teacher_sampler: solvers.Sampler  # the teacher's per-window solve
    # The student's kind; `check` gives it a linear process, `run` the teacher's.
    kind: kinds.Piecewise


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def kind_of(config: ml_collections.ConfigDict, process: diffusion.Process = diffusion.Linear()) -> kinds.Piecewise:
    """The piecewise kind `config` trains: config.model's network, perflow.windows, perflow.parameterization;
    `process` is the teacher's (a linear one stands in until the teacher is read: the eps
    parameterisations then get a VP one, which only `run` checks against the teacher)."""
    cfg = config.perflow
    if cfg.parameterization in windows.EPS_PARAMETERIZATIONS and not isinstance(process, diffusion.VP):
        process = diffusion.VP()
    kind = kinds.Piecewise.from_model_config(config.model, windows=cfg.windows, parameterization=cfg.parameterization,
                                             process=process)
    kind.module  # noqa: B018 - builds the network now: an unknown model or field fails here
    return kind


def check(config: ml_collections.ConfigDict) -> Options:
    """Static checks of `config.perflow` and the shared sections (one-line ConfigErrors); the options."""
    cfg = config.perflow
    if not cfg.teacher:
        raise errors.ConfigError('perflow.teacher: a teacher export directory (or pipeline stage name) is required')
    if not _is_int(cfg.windows) or cfg.windows < 1:
        raise errors.ConfigError(f'perflow.windows={cfg.windows!r}: must be an integer >= 1')
    if not _is_int(cfg.grid_points) or cfg.grid_points < cfg.windows:
        raise errors.ConfigError(f'perflow.grid_points={cfg.grid_points!r}: must be an integer >= perflow.windows '
                                 f'({cfg.windows}), so that every window has training times')
    try:
        sampler = solvers.parse_sampler(cfg.teacher_sampler)
    except ValueError as e:
        raise errors.ConfigError(f'perflow.teacher_sampler: {e}') from None
    if sampler.steps is None:
        raise errors.ConfigError(f'perflow.teacher_sampler={cfg.teacher_sampler!r}: the teacher solves every window '
                                 'with a fixed-step sampler (e.g. euler@8, steps per window)')
    if cfg.parameterization not in windows.PARAMETERIZATIONS:
        raise errors.ConfigError(f'perflow.parameterization={cfg.parameterization!r}: expected one of '
                                 f"{', '.join(windows.PARAMETERIZATIONS)}")
    flow = training.flow(config)
    if flow.time != 'uniform':
        raise errors.ConfigError(f'flow.time={flow.time!r}: perflow draws its own times t = k / perflow.grid_points; '
                                 "leave flow.time='uniform'")
    if flow.uses_lpips:
        raise errors.ConfigError(f'flow.loss={flow.loss!r}: perflow regresses a field on the window line, use l2 or '
                                 'pseudo_huber')
    training.check_training(config, kind_of)
    return Options(windows=cfg.windows, grid_points=cfg.grid_points, teacher_sampler=sampler, kind=kind_of(config))


def loss_fn(params, batch: dict, rng: jax.Array, ctx: training.Context):
    """The PeRFlow loss of the module docstring on a batch of real data `x1` (and labels)."""
    opts = ctx.options
    kind, x1, label = opts.kind, batch['x1'], ctx.label(batch)
    k_t, k_eps, k_drop = jax.random.split(rng, 3)
    k = jax.random.randint(k_t, (x1.shape[0],), 0, opts.grid_points)
    t = windows.grid_time(k, opts.grid_points)
    s, e = windows.window_bounds(windows.window_of(k, opts.windows, opts.grid_points), opts.windows)
    z_s = kind.process.marginal(x1, ctx.source(k_eps, x1.shape), s)
    z_e, _ = ctx.teacher_kind.solve(ctx.teacher_params, z_s, opts.teacher_sampler, t0=s, t1=e, label=label)
    z_e = jax.lax.stop_gradient(z_e)
    z_t = windows.line_point(z_s, z_e, s, e, t)
    pred = ctx.apply(params, z_t, t, k_drop, label=label)
    return ctx.flow.field_loss(pred, kind.target(z_s, z_e, s, e), t=t, x1=x1, x1_hat=x1)


def _teacher(config: ml_collections.ConfigDict, options: Options) -> kinds.Model:
    """The teacher export: a kind with a forward `process` and a `solve` (a velocity field, a ddpm model),
    which takes perflow.teacher_sampler."""
    cfg = config.perflow
    teacher = training.load_model(cfg.teacher, 'perflow.teacher')
    kind = teacher.kind
    if not (hasattr(kind, 'process') and hasattr(kind, 'solve')):
        raise errors.ConfigError(f'perflow.teacher: {cfg.teacher} holds a model of kind {kind.name!r}; PeRFlow needs a '
                                 'teacher with a noising process and window solves (a velocity field or ddpm), '
                                 'not a caf or piecewise model')
    if not kind.supports(options.teacher_sampler):
        raise errors.ConfigError(f'perflow.teacher_sampler={cfg.teacher_sampler!r}: does not apply to the teacher '
                                 f'{cfg.teacher}, a model of kind {kind.name!r}')
    if cfg.parameterization in windows.EPS_PARAMETERIZATIONS and not isinstance(kind.process, diffusion.VP):
        raise errors.ConfigError(f'perflow.parameterization={cfg.parameterization!r}: needs a VP (ddpm) teacher; '
                                 f'the teacher {cfg.teacher} (kind {kind.name!r}) has a {kind.process.name} process')
    source = config.data.get('source')
    if (isinstance(kind.process, diffusion.VP) and config.data.kind == 'toy2d' and source is not None
            and source.get('name') != 'normal'):
        raise errors.ConfigError(f"data.source.name={source.get('name')!r}: a VP teacher noises with a standard "
                                 "normal eps; set data.source.name='normal'")
    return teacher


def _start(model: kinds.Model, path: str, field: str, config: ml_collections.ConfigDict):
    """The params of `model` (the export at `path`) that the student starts from: one network of
    config.model's architecture (up to training-only fields such as dropout)."""
    if isinstance(model.kind, kinds.ConstantAcceleration) or 'model' not in model.meta:
        raise errors.ConfigError(f'{field}: {path} holds a model of kind {model.kind.name!r}; the student starts from '
                                 'one network of config.model')
    training.check_network(path, field, model.meta, config)
    return model.params


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the piecewise student on windows of the teacher's trajectories, exports and evaluates it."""
    options = check(config)
    cfg = config.perflow
    teacher = _teacher(config, options)
    options = dataclasses.replace(options, kind=kind_of(config, teacher.kind.process))
    if cfg.init:
        init = _start(training.load_model(cfg.init, 'perflow.init'), cfg.init, 'perflow.init', config)
    else:
        init = _start(teacher, cfg.teacher, 'perflow.teacher', config)

    def batches(mesh):
        return datasets.make_batches(config, mesh, config.train.batch_size, config.seed)

    return training.fit(config, workdir, METHOD, loss_fn=loss_fn, batches=batches, init_params=init, options=options,
                        teacher=teacher, kind=options.kind)


METHOD = method.Method(name='perflow', run=run, check=check, section=defaults,
                       references=('perflow.teacher', 'perflow.init'))
