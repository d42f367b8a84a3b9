"""The one training loop: mesh, state, jitted data-parallel step, EMA, checkpoints, metrics.

It knows nothing about any method: a method hands it a pure
`loss_fn(params, batch, rng, ctx) -> (loss, metrics)` and `batches(step) -> global arrays`.
"""

import json
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from flowjax import checkpoint, errors, preemption, sharding, writers
from flowjax.data import stream
from flowjax.models import kinds

LossFn = Callable[[Any, dict, jax.Array, Any], tuple[jax.Array, dict]]

# train.remat -> what the backward pass keeps of the forward (jax.checkpoint policy): 'none'
# keeps everything; 'dots' keeps only convolution and matmul outputs and recomputes the
# elementwise work (normalisation, activations, dropout) between them; 'full' keeps nothing
# but the inputs and recomputes the whole forward pass (a third more compute, least memory).
REMAT = {'none': None, 'dots': jax.checkpoint_policies.dots_saveable,
         'full': jax.checkpoint_policies.nothing_saveable}
# train.nonfinite: what a step with a non-finite loss or gradient norm (which changes nothing) leads to.
NONFINITE = ('stop', 'skip')


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any


def optimizer(cfg: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Adam with linear warm-up to `lr` and optional global-norm clipping; with `weight_decay` > 0,
    AdamW (optax.adamw: each update also subtracts rate * weight_decay * param, from every parameter).

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

    if cfg.weight_decay > 0:
        adam = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    else:
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
    decay = cfg.weight_decay
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0.0 <= decay < float('inf'):
        raise errors.ConfigError(f'train.weight_decay={decay!r}: must be a number >= 0 (0: Adam; > 0: AdamW)')
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise errors.ConfigError(f'train.ema_decay={cfg.ema_decay}: must be in [0, 1)')
    for field in ('log_every', 'checkpoint_every', 'keep_checkpoints', 'n_jitted_steps'):
        if isinstance(cfg[field], bool) or not isinstance(cfg[field], int) or cfg[field] < 1:
            raise errors.ConfigError(f'train.{field}={cfg[field]!r}: must be an integer >= 1')
    for field in ('log_every', 'checkpoint_every'):
        if cfg[field] % cfg.n_jitted_steps:
            raise errors.ConfigError(f'train.{field}={cfg[field]}: must be a multiple of '
                                     f'train.n_jitted_steps={cfg.n_jitted_steps}')
    if not isinstance(cfg.ema_warmup, bool):
        raise errors.ConfigError(f'train.ema_warmup={cfg.ema_warmup!r}: must be True or False')
    if cfg.nonfinite not in NONFINITE:
        raise errors.ConfigError(f"train.nonfinite={cfg.nonfinite!r}: expected one of {', '.join(NONFINITE)}")
    if cfg.remat not in REMAT:
        raise errors.ConfigError(f"train.remat={cfg.remat!r}: expected one of {', '.join(REMAT)}")
    if isinstance(cfg.prefetch, bool) or not isinstance(cfg.prefetch, int) or cfg.prefetch < 0:
        raise errors.ConfigError(f'train.prefetch={cfg.prefetch!r}: must be an integer >= 0')


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, decay: float, rng: jax.Array, remat: str = 'none',
                    ema_warmup: bool = True):
    """The pure step (state, batch, ctx) -> (state, metrics); randomness folded with the step.

    Random draws inside `loss_fn` use the partitionable threefry, so each example's
    noise and t depend on (seed, step, example index) and not on how the batch is sharded.
    `remat` (a REMAT key) trades recomputation in the backward pass for activation memory.
    The EMA decays by `decay` with the warm-up rule (`ema_decay`), or by `decay` from the first
    update when `ema_warmup` is False (rfpp's EMA 0.9999 from step 1).
    A step whose loss or gradient norm is not finite keeps params, optimiser state and EMA as they
    were (a select XLA fuses into the update) and reports `nonfinite` 1; the step counter still
    advances, so the next step draws new randomness and reads the next batch.
    """
    policy = REMAT[remat]
    grad_fn = jax.value_and_grad(loss_fn if policy is None else jax.checkpoint(loss_fn, policy=policy), has_aux=True)

    def step(state: TrainState, batch: dict, ctx: Any) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(rng, state.step)
        (loss, aux), grads = grad_fn(state.params, batch, key, ctx)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = ema_decay(decay, state.step) if ema_warmup else decay
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(state.step),
                   'nonfinite': 1.0 - finite.astype(jnp.float32), **aux}
        return TrainState(step=state.step + 1, params=keep(params, state.params),
                          ema_params=keep(ema, state.ema_params), opt_state=keep(opt_state, state.opt_state)), metrics

    return step


def scan_steps(step: Callable[[TrainState, dict, Any], tuple[TrainState, dict]]):
    """(state, batches, ctx) -> (state, metrics): `step` over a tuple of consecutive batches in one
    `lax.scan`, so one dispatch (one jit call) runs len(batches) steps; metrics get a leading step axis.

    A single batch runs without the scan: XLA's CPU backend runs convolutions inside a loop body
    an order of magnitude slower (measured: 0.5 vs 6.5 steps/s for the digits U-Net on 2 cores).
    """

    def steps(state: TrainState, batches: tuple[dict, ...], ctx: Any) -> tuple[TrainState, dict]:
        if len(batches) == 1:
            state, metrics = step(state, batches[0], ctx)
            return state, jax.tree.map(lambda m: m[None], metrics)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
        return jax.lax.scan(lambda s, batch: step(s, batch, ctx), state, stacked)

    return steps


def chunks(start: int, stop: int, n: int) -> list[tuple[int, int]]:
    """[lo, hi) step ranges of one jit call each: ends on multiples of n (and at stop)."""
    bounds = [start, *range((start // n + 1) * n, stop, n), stop]
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


def loop(step_fn, state: TrainState, ctx: Any, batches: Callable[[int], dict], ranges: list[tuple[int, int]],
         prefetch: int, after: Callable[[int, TrainState, dict], None] | None = None) -> TrainState:
    """Runs `step_fn` (from `jit_steps`) over the step ranges; `after(done, state, metrics)` follows
    each call. The batches of the next `prefetch` calls are read and put on the devices in a
    background thread while the devices work; nothing here waits for the devices."""
    read = lambda lo_hi: tuple(batches(s) for s in range(*lo_hi))
    for (_, done), batch in zip(ranges, stream.read_ahead(read, ranges, prefetch)):
        state, metrics = step_fn(state, batch, ctx)
        if after is not None:
            after(done, state, metrics)
    return state


def init_state(config: ml_collections.ConfigDict, kind: kinds.Kind, tx: optax.GradientTransformation,
               sample_shape: tuple[int, ...], mesh, init_params: Any | None = None):
    """(abstract state with shardings, jitted `init() -> state`): params from `init_params` or
    drawn from config.seed, replicated over the mesh."""
    replicated = sharding.replicated(mesh)

    def init(key, given):
        if given is not None:  # an argument, not a closure, so big weights are no jit constants
            params = given
        else:
            params = kind.init(key, sample_shape)
        # The EMA starts equal to the params but must be its own buffer: the step donates both.
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))

    # Initialisation draws from the rbg generator: XLA compiles threefry for every parameter
    # separately, which takes minutes on a CPU for a U-Net (rbg: seconds). Params are replicated,
    # so the values do not depend on the device count.
    init_key = jax.random.key(config.seed, impl='rbg')
    abstract = jax.eval_shape(init, init_key, init_params)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
    state_sharding = jax.tree.map(lambda a: a.sharding, abstract)
    return abstract, lambda: jax.jit(init, out_shardings=state_sharding)(init_key, init_params)


def jit_steps(config: ml_collections.ConfigDict, loss_fn: LossFn, tx: optax.GradientTransformation,
              schedule: optax.Schedule, abstract_state: Any, mesh):
    """The jitted `(state, batches, ctx) -> (state, metrics)` the loop calls: `config.train` steps
    (remat, EMA) scanned over a tuple of batches, the state donated."""
    cfg = config.train
    step = make_train_step(loss_fn, tx, schedule, cfg.ema_decay,
                           jax.random.fold_in(jax.random.key(config.seed), 1), cfg.remat, cfg.ema_warmup)
    state_sharding = jax.tree.map(lambda a: a.sharding, abstract_state)
    return jax.jit(scan_steps(step), out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)


def train(config: ml_collections.ConfigDict, workdir: str | epath.Path, *, kind: kinds.Kind,
          loss_fn: LossFn, ctx: Any, batches: Callable[[int], dict], sample_shape: tuple[int, ...],
          mesh, init_params: Any | None = None, identity: dict | None = None,
          defaults: dict | None = None) -> TrainState:
    """Trains to `config.train.steps` (resuming from the latest checkpoint) and exports the EMA weights.

    `init_params` starts the student from given weights (e.g. a teacher) instead of random init.
    `identity` / `defaults`: what a resumed run's config must match (`checkpoint.Checkpoints`).
    On SIGTERM (or the first Ctrl-C) the jit call in flight finishes, its step is saved and
    `errors.Preempted` is raised; a non-finite step with train.nonfinite='stop' raises a UserError
    before anything after it is saved.
    """
    cfg = config.train
    validate(cfg, mesh)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tx, schedule = optimizer(cfg)
    abstract, init = init_state(config, kind, tx, sample_shape, mesh, init_params)
    ckpt = checkpoint.Checkpoints(workdir, config, identity, defaults)
    state = ckpt.restore(abstract)
    if state is None:
        state = init()
    start = int(state.step)
    if start:
        logging.info('resumed from %s at step %d', ckpt.directory, start)
    step_fn = jit_steps(config, loss_fn, tx, schedule, abstract, mesh)

    writer = writers.MetricsWriter(workdir, resume_step=start)
    progress = writers.Progress(cfg.steps, start)
    pending, last = [], start  # (steps done before it, metrics) of each jit call since the last log
    try:
        with preemption.Watch() as watch:

            def after(done: int, state: TrainState, metrics: dict) -> None:
                nonlocal pending, last
                lo, last = last, done
                pending.append((lo, metrics))
                stop = watch.reached(lo, done)
                log = done % cfg.log_every == 0 or done == cfg.steps
                save = stop or done == cfg.steps or ckpt.due(done)
                if log or save:  # the only places the host waits for the devices
                    pending = jax.device_get(pending)
                    if cfg.nonfinite == 'stop':
                        check_finite(pending, ckpt.latest_step())
                if log:
                    logged = summarize(pending)
                    pending = []
                    logged['steps_per_sec'] = progress(done, logged)
                    writer.write(done, logged)
                if save:
                    ckpt.save(done, state)
                if stop:
                    raise errors.Preempted(f'{preemption.describe(watch.signum)} at step {done}; checkpoint saved in '
                                           f'{ckpt.directory}; rerun the same command to resume', watch.signum)

            state = loop(step_fn, state, ctx, batches, chunks(start, cfg.steps, cfg.n_jitted_steps),
                         cfg.prefetch, after)
    finally:  # a save in flight completes even when the run stops (non-finite step, preemption, crash)
        ckpt.close()
        writer.close()

    checkpoint.export(workdir, state.ema_params, export_meta(config, kind, sample_shape, int(state.step)))
    return state


def check_finite(pending: list[tuple[int, dict]], last_checkpoint: int | None) -> None:
    """Raises the one-line UserError naming the first step flagged `nonfinite` in host metrics
    [(steps done before, metrics with a leading step axis)], if any."""
    for lo, metrics in pending:
        bad = np.flatnonzero(metrics['nonfinite'])
        if bad.size:
            i = int(bad[0])
            saved = (f'the last checkpoint (step {last_checkpoint}) is intact' if last_checkpoint is not None
                     else 'no checkpoint was saved before it')
            raise errors.UserError(
                f"train: loss or gradients not finite at step {lo + i + 1} (loss {float(metrics['loss'][i]):.4g}, "
                f"gradient norm {float(metrics['grad_norm'][i]):.4g}); {saved}; lower train.lr, keep train.grad_clip, "
                "or set train.nonfinite='skip' to skip such steps")


def summarize(pending: list[tuple[int, dict]]) -> dict[str, float]:
    """The logged scalars of host metrics [(steps done before, metrics)]: each metric's mean over
    the steps that were not skipped; `nonfinite`, how many were (and a warning if any)."""
    stacked = {k: np.concatenate([np.asarray(m[k]) for _, m in pending]) for k in pending[0][1]}
    ok = stacked['nonfinite'] == 0
    logged = {k: float(np.mean(v[ok] if ok.any() else v)) for k, v in stacked.items() if k != 'nonfinite'}
    logged['nonfinite'] = float(np.sum(~ok))
    if not ok.all():
        first = pending[0][0]
        logging.warning('train: skipped %d of the steps %d..%d (loss or gradients not finite), the first at step %d',
                        int(np.sum(~ok)), first + 1, first + len(ok), first + int(np.argmin(ok)) + 1)
    return logged


def export_meta(config: ml_collections.ConfigDict, kind: kinds.Kind, sample_shape: tuple[int, ...],
                step: int) -> dict:
    """The meta.json of an export of a `kind` model after `step` steps (what later stages read):
    the kind and its network configs (`kind.meta()`), the sample shape, the step, the flow."""
    return {'method': config.method, **kind.meta(), 'sample_shape': list(sample_shape), 'step': step,
            'seed': config.seed, 'flow': json.loads(config.flow.to_json())}
