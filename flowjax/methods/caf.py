"""Constant acceleration flow (CAF, docs/methods.md, CAF): a velocity network, then an acceleration
network conditioned on its initial velocity, trained on a coupling store or the independent coupling.

The run trains two stages in its workdir, each resumable on its own:

    velocity/      v(x, t) at every t on CAF's path with v0 = h (x1 - x0), target h (x1 - x0)
    acceleration/  a(x_t, t, v_hat), v_hat = stopgrad(v_ema(x0, 0)) on the path with v0 = v_hat,
                   target 2 (x1 - x0) - 2 v_hat; it starts from the velocity network's EMA weights
    export/        the CAF model (kind 'caf': both EMA networks, h, ivc), which every consumer
                   samples, inverts and evaluates through its kind

`train.steps` counts both stages: `caf.velocity_steps` of them (default half) train the velocity
network, the rest the acceleration network, so a CAF run and a reflow run with the same
train.steps have the same step budget. Each stage has its own warm-up, schedule and EMA.
"""

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from ml_collections import config_dict

from flowjax import checkpoint, errors, evaluate, sharding, train
from flowjax.data import couplings, datasets
from flowjax.flows import paths
from flowjax.methods import method, training
from flowjax.models import kinds

STAGES = ('velocity', 'acceleration')


def defaults() -> ml_collections.ConfigDict:
    """`config.caf`: the two networks' training (docs/methods.md, CAF)."""
    c = ml_collections.ConfigDict()
    c.couplings = config_dict.placeholder(str)  # coupling store dir or stage name; None: independent coupling
    c.h = 1.5  # v0 = h (x1 - x0) in the velocity stage; > 0 (1.5 on images)
    c.ivc = True  # initial velocity conditioning: the acceleration network reads v_hat (False: zeros)
    c.velocity_steps = config_dict.placeholder(int)  # of train.steps; None: train.steps // 2
    # a velocity export (or stage) whose weights start the velocity network, its input layer widened
    # with zeros for the velocity slot; None: fresh
    c.init = config_dict.placeholder(str)
    return c


@dataclasses.dataclass(frozen=True)
class Options:
    kind: kinds.ConstantAcceleration  # the model both stages train
    velocity_steps: int
    acceleration_steps: int


def kind_of(config: ml_collections.ConfigDict) -> kinds.ConstantAcceleration:
    """The CAF kind `config` trains: config.model's architecture, the data's channels, caf.h and caf.ivc."""
    shape = datasets.sample_shape(config)
    kind = kinds.ConstantAcceleration.from_model_config(config.model, channels=shape[-1], h=config.caf.h,
                                                        ivc=config.caf.ivc)
    kind.module  # noqa: B018 - builds the network now: an unknown model or field fails here
    return kind


def check(config: ml_collections.ConfigDict) -> Options:
    """Static checks of `config.caf` and the shared sections; the kind and the two stages' steps."""
    cfg = config.caf
    if isinstance(cfg.h, bool) or not isinstance(cfg.h, int | float) or not 0 < cfg.h < float('inf'):
        raise errors.ConfigError(f'caf.h={cfg.h!r}: must be a number > 0 (v0 = h (x1 - x0); 1.5 on images)')
    if not isinstance(cfg.ivc, bool):
        raise errors.ConfigError(f'caf.ivc={cfg.ivc!r}: must be True or False')
    steps = config.train.steps
    if steps < 2:  # train.validate has checked it is an integer >= 1
        raise errors.ConfigError(f'train.steps={steps}: CAF trains two networks one after the other, it needs at '
                                 'least 2 steps (caf.velocity_steps of them for the velocity network)')
    velocity_steps = steps // 2 if cfg.velocity_steps is None else cfg.velocity_steps
    if isinstance(velocity_steps, bool) or not isinstance(velocity_steps, int) or not 1 <= velocity_steps < steps:
        raise errors.ConfigError(f'caf.velocity_steps={cfg.velocity_steps!r}: must be an integer in [1, train.steps) '
                                 f'(train.steps={steps} counts both networks\' steps), or None for half')
    training.check_training(config, kind_of)
    return Options(kind=kind_of(config), velocity_steps=velocity_steps, acceleration_steps=steps - velocity_steps)


def _pairs(batch: dict, rng: jax.Array, ctx: training.Context) -> tuple[jax.Array, jax.Array, jax.Array, tuple]:
    """(x0, x1, t, keys): the batch's pair (fresh noise x0 for the independent coupling) and t."""
    x1 = batch['x1']
    k_t, k_x0, k_drop = jax.random.split(rng, 3)
    x0 = batch['x0'] if 'x0' in batch else ctx.source(k_x0, x1.shape)
    return x0, x1, ctx.flow.sample_t(k_t, x1.shape[0]), k_drop


def velocity_loss_fn(params, batch: dict, rng: jax.Array, ctx: training.Context):
    """The velocity stage: v(x_t, t) against h (x1 - x0) on x_t = constant_acceleration(x0, x1, h (x1 - x0), t);
    LPIPS losses compare x1_hat = x_t + (1 - t) v / h with x1, the Huber term unweighted."""
    x0, x1, t, k_drop = _pairs(batch, rng, ctx)
    kind, label = ctx.options.kind, ctx.label(batch)
    target = kind.h * (x1 - x0)
    x_t = paths.constant_acceleration(x0, x1, target, t)
    v = kind.initial_velocity(params, x_t, t, dropout_rng=k_drop, label=label)
    x1_hat = x_t + paths.broadcast_time(1.0 - t, x_t) * v / kind.h
    return ctx.flow.field_loss(v, target, t=t, x1=x1, x1_hat=x1_hat, perceptual=ctx.distance_fn())


def acceleration_loss_fn(params, batch: dict, rng: jax.Array, ctx: training.Context):
    """The acceleration stage: v_hat = stopgrad(v(x0, 0)) of the frozen velocity EMA (`ctx.teacher_params`),
    x_t = constant_acceleration(x0, x1, v_hat, t), a(x_t, t, v_hat) against 2 (x1 - x0) - 2 v_hat; LPIPS
    losses compare x1_hat = x_t + (1 - t) v_hat + (1 - t)(1 + t) / 2 a with x1, the Huber term unweighted."""
    x0, x1, t, k_drop = _pairs(batch, rng, ctx)
    kind, label = ctx.options.kind, ctx.label(batch)
    v_hat = jax.lax.stop_gradient(
        kind.initial_velocity(ctx.teacher_params, x0, jnp.zeros_like(t), label=label))
    x_t = paths.constant_acceleration(x0, x1, v_hat, t)
    a = kind.acceleration(params, x_t, t, v_hat, dropout_rng=k_drop, label=label)
    target = 2.0 * (x1 - x0) - 2.0 * v_hat
    rest = paths.broadcast_time(1.0 - t, x_t)
    x1_hat = x_t + rest * v_hat + rest * paths.broadcast_time(1.0 + t, x_t) * 0.5 * a
    return ctx.flow.field_loss(a, target, t=t, x1=x1, x1_hat=x1_hat, perceptual=ctx.distance_fn())


@dataclasses.dataclass(frozen=True)
class _Network:
    """One CAF network as the training loop sees it: its init and its stage export's meta (kind
    'caf.velocity' / 'caf.acceleration': a stage's weights, not a model consumers load)."""

    kind: kinds.ConstantAcceleration
    stage: str

    def init(self, key: jax.Array, sample_shape: tuple[int, ...]):
        return self.kind.network_init(key, sample_shape)

    def meta(self) -> dict:
        return {**self.kind.meta(), 'kind': f'{self.kind.name}.{self.stage}'}


def widen(given, fresh):
    """The velocity export's params `given` as a CAF network's: every leaf of the same shape as in
    `fresh` is kept; a leaf whose one differing axis is twice as long in `fresh` (the input layer, now
    reading x beside a velocity) gets zeros appended on it, so the network starts as the export."""
    def leaf(path, g, f):
        if g.shape == f.shape:
            return g
        axes = [i for i, (a, b) in enumerate(zip(g.shape, f.shape)) if a != b]
        if len(g.shape) != len(f.shape) or len(axes) != 1 or f.shape[axes[0]] != 2 * g.shape[axes[0]]:
            raise errors.ConfigError(f'caf.init: parameter {jax.tree_util.keystr(path)} has shape {g.shape}, the CAF '
                                     f'network needs {f.shape}')
        return jnp.concatenate([g, jnp.zeros_like(g)], axis=axes[0])

    # Matched by parameter name: a mismatch is one line naming them (not jax's multi-line tree error).
    wanted = {jax.tree_util.keystr(path): f for path, f in jax.tree_util.tree_leaves_with_path(fresh)}
    names = {jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(given)}
    if names != set(wanted):
        only_given, only_fresh = sorted(names - set(wanted)), sorted(set(wanted) - names)
        raise errors.ConfigError(f"caf.init: its parameters do not match the CAF network's (only in the export: "
                                 f"{', '.join(only_given[:3]) or 'none'}; only in the network: "
                                 f"{', '.join(only_fresh[:3]) or 'none'})")
    return jax.tree_util.tree_map_with_path(lambda path, g: leaf(path, g, wanted[jax.tree_util.keystr(path)]), given)


def _stage_config(config: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
    c = copy.deepcopy(config)
    c.train.steps = steps
    return c


def _batches(config: ml_collections.ConfigDict):
    cfg = config.caf

    def batches(mesh):
        if cfg.couplings:
            return couplings.make_batches(cfg.couplings, mesh, config.train.batch_size, config.seed,
                                          expect={'shape': list(datasets.sample_shape(config))})
        return datasets.make_batches(config, mesh, config.train.batch_size, config.seed)

    return batches


def _check_resume(workdir: epath.Path, options: Options) -> None:
    """A rerun must keep the velocity network its acceleration stage has trained against: once
    `acceleration/` exists, the velocity export's step must be `caf.velocity_steps`."""
    velocity, acceleration = workdir / 'velocity', workdir / 'acceleration'
    if acceleration.exists() and checkpoint.is_exported(velocity):
        step = json.loads((checkpoint.export_dir(velocity) / 'meta.json').read_text())['step']
        if step != options.velocity_steps:
            raise errors.ConfigError(
                f'caf.velocity_steps: this run gives the velocity network {options.velocity_steps} steps, but the '
                f'acceleration stage in {acceleration} trains against the one of {step} steps; set '
                f'caf.velocity_steps={step} (train.steps may grow) or use a new workdir')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the velocity network, then the acceleration network, exports the CAF model, evaluates it."""
    options = check(config)
    kind, workdir = options.kind, epath.Path(workdir)
    _check_resume(workdir, options)
    mesh = sharding.data_mesh()
    shape = datasets.sample_shape(config)
    identity, defaults_ = METHOD.identity(config), METHOD.default_identity()
    batches = _batches(config)

    init = None
    if config.caf.init:
        given = training.load_model(config.caf.init, 'caf.init', config).params
        fresh = jax.eval_shape(lambda key: kind.network_init(key, shape), jax.random.key(0))
        init = jax.device_put(widen(given, fresh), sharding.replicated(mesh))
    stage_config = _stage_config(config, options.velocity_steps)
    ctx = training.context(stage_config, mesh, options=options, kind=kind)
    velocity = train.train(stage_config, workdir / 'velocity', kind=_Network(kind, 'velocity'),
                           loss_fn=velocity_loss_fn, ctx=ctx, batches=batches(mesh), sample_shape=shape, mesh=mesh,
                           init_params=init, identity=identity, defaults=defaults_).ema_params

    stage_config = _stage_config(config, options.acceleration_steps)
    ctx = training.context(stage_config, mesh, options=options, kind=kind, teacher=kinds.Model(kind, velocity))
    acceleration = train.train(stage_config, workdir / 'acceleration', kind=_Network(kind, 'acceleration'),
                               loss_fn=acceleration_loss_fn, ctx=ctx, batches=batches(mesh), sample_shape=shape,
                               mesh=mesh, init_params=velocity, identity=identity, defaults=defaults_).ema_params

    params = {'velocity': velocity, 'acceleration': acceleration}
    meta = train.export_meta(config, kind, shape, config.train.steps)
    checkpoint.export(workdir, params, meta)
    if not config.eval.samplers:
        return {}
    name = config.name or config.method
    return evaluate.evaluate(config, workdir, {name: kinds.Model(kind, params)})


METHOD = method.Method(name='caf', run=run, check=check, section=defaults, references=('caf.couplings', 'caf.init'))
