"""The one training loop: mesh, state, jitted data-parallel step, EMA, checkpoints, metrics.

It knows nothing about any method: a method hands it a pure
`loss_fn(params, batch, rng, ctx) -> (loss, metrics)` and `batches(step) -> global arrays`.
"""

import json
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from etils import epath

from flowjax import checkpoint, errors, models, sharding, writers

LossFn = Callable[[Any, dict, jax.Array, Any], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def optimizer(cfg: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam with linear warm-up to `lr` and optional global-norm clipping.

    Update n (counting from 1) uses lr * min(n / warmup_steps, 1); with `lr_final` < 1 the
    rate then follows a cosine from lr to lr * lr_final at `steps` (1: constant, the reference).
    """
    warmup = max(cfg.warmup_steps, 1)
    decay_steps = max(cfg.steps - warmup, 1)

    def schedule(count):
        n = count + 1.0
        progress = jnp.clip((n - warmup) / decay_steps, 0.0, 1.0)
        decay = cfg.lr_final + (1.0 - cfg.lr_final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return cfg.lr * jnp.minimum(n / warmup, 1.0) * decay

    adam = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps)
    if cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adam), schedule
    return adam, schedule


def ema_decay(decay: float, step: jax.Array) -> jax.Array:
    """The warm-up rule min(decay, (1 + n) / (10 + n)) after n updates."""
    n = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def validate(cfg: ml_collections.ConfigDict, mesh) -> None:
    if not isinstance(cfg.steps, int) or cfg.steps < 1:
        raise errors.ConfigError(f'train.steps={cfg.steps}: must be an integer >= 1')
    sharding.check_batch_size(cfg.batch_size, mesh)
    if cfg.lr <= 0:
        raise errors.ConfigError(f'train.lr={cfg.lr}: must be > 0')
    if not 0.0 <= cfg.lr_final <= 1.0:
        raise errors.ConfigError(f'train.lr_final={cfg.lr_final}: must be in [0, 1] (a fraction of train.lr)')
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise errors.ConfigError(f'train.ema_decay={cfg.ema_decay}: must be in [0, 1)')
    for field in ('log_every', 'checkpoint_every', 'keep_checkpoints'):
        if cfg[field] < 1:
            raise errors.ConfigError(f'train.{field}={cfg[field]}: must be >= 1')


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, decay: float, rng: jax.Array):
    """The pure step (state, batch, ctx) -> (state, metrics); randomness folded with the step.

    Random draws inside `loss_fn` use the partitionable threefry, so each example's
    noise and t depend on (seed, step, example index) and not on how the batch is sharded.
    """

    def step(state: TrainState, batch: dict, ctx: Any) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(rng, state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key, ctx)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = ema_decay(decay, state.step)
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
        metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'lr': schedule(state.step), **aux}
        return TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics

    return step


def train(config: ml_collections.ConfigDict, workdir: str | epath.Path, *, module: nn.Module,
          loss_fn: LossFn, ctx: Any, batches: Callable[[int], dict], sample_shape: tuple[int, ...],
          mesh, init_params: Any | None = None) -> TrainState:
    """Trains to `config.train.steps` (resuming from the latest checkpoint) and exports the EMA weights.

    `init_params` starts the student from given weights (e.g. a teacher) instead of random init.
    """
    cfg = config.train
    validate(cfg, mesh)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tx, schedule = optimizer(cfg)
    root = jax.random.key(config.seed)
    replicated = sharding.replicated(mesh)

    def init(key, given):
        if given is not None:  # an argument, not a closure, so big weights are no jit constants
            params = given
        else:
            dummy = jnp.zeros((1, *sample_shape), jnp.float32)
            label = (jnp.zeros((1,), jnp.int32),) if models.num_classes(config.model) else ()
            params = module.init(key, dummy, jnp.zeros((1,), jnp.float32), *label)
        # The EMA starts equal to the params but must be its own buffer: the step donates both.
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))

    # Initialisation draws from the rbg generator: XLA compiles threefry for every parameter
    # separately, which takes minutes on a CPU for a U-Net (rbg: seconds). Params are replicated,
    # so the values do not depend on the device count.
    init_key = jax.random.key(config.seed, impl='rbg')
    abstract = jax.eval_shape(init, init_key, init_params)
    state_sharding = jax.tree.map(lambda _: replicated, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, state_sharding)

    ckpt = checkpoint.Checkpoints(workdir, config)
    state = ckpt.restore(abstract)
    if state is None:
        state = jax.jit(init, out_shardings=state_sharding)(init_key, init_params)
    start = int(state.step)
    if start:
        logging.info('resumed from %s at step %d', workdir / 'checkpoints', start)

    step_fn = jax.jit(
        make_train_step(loss_fn, tx, schedule, cfg.ema_decay, jax.random.fold_in(root, 1)),
        out_shardings=(state_sharding, replicated), donate_argnums=0)

    writer = writers.MetricsWriter(workdir, resume_step=start)
    progress = writers.Progress(cfg.steps, start)
    pending = []
    for step in range(start, cfg.steps):
        state, metrics = step_fn(state, batches(step), ctx)
        pending.append(metrics)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            logged = {k: sum(float(m[k]) for m in jax.device_get(pending)) / len(pending) for k in pending[0]}
            pending = []
            logged['steps_per_sec'] = progress(done, logged)
            writer.write(done, logged)
        ckpt.save(done, state, force=done == cfg.steps)
    ckpt.close()
    writer.close()

    meta = {'method': config.method, 'model': json.loads(config.model.to_json()), 'sample_shape': list(sample_shape),
            'step': int(state.step), 'seed': config.seed, 'flow': json.loads(config.flow.to_json())}
    checkpoint.export(workdir, state.ema_params, meta)
    return state
