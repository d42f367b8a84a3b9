"""A diffusion teacher (Ho et al.): one network trained to predict the noise eps of the VP process of a
discrete DDPM schedule, on any data kind (docs/methods.md, Diffusion teacher (ddpm)).

Per example: k uniform in {1..T}, t = 1 - k / T (flowjax time: t = 0 is k = T, pure noise), eps ~ N(0, I),
x_t = alpha(t) x1 + sigma(t) eps, and the flow's loss (default L2) on eps_hat(x_t, t) against eps, the
LPIPS losses comparing the data estimate (x_t - sigma eps_hat) / alpha with x1. The export is a model of
kind 'ddpm' (`kinds.Diffusion`): every consumer samples it through its probability-flow ODE, and ddim@N
steps it by DDIM, from t = 0 to 1.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from flowjax import checkpoint, errors
from flowjax.data import datasets
from flowjax.flows import diffusion
from flowjax.methods import method, training
from flowjax.models import kinds


def defaults() -> ml_collections.ConfigDict:
    """`config.ddpm`: the noise schedule and step count of the diffusion trained (docs/methods.md, Diffusion
    teacher (ddpm))."""
    c = ml_collections.ConfigDict()
    c.schedule = 'linear'  # 'linear' (betas 1e-4 .. 0.02, Ho et al.) or 'cosine' (Nichol & Dhariwal)
    c.timesteps = 1000  # T, the diffusion steps; an integer >= 2
    # a ddpm export (or stage) to start from (fine-tuning): the same network, schedule and timesteps; None: fresh
    c.init = config_dict.placeholder(str)
    return c


@dataclasses.dataclass(frozen=True)
class Options:
    kind: kinds.Diffusion  # the model trained: config.model as an eps network of the VP process


def kind_of(config: ml_collections.ConfigDict) -> kinds.Diffusion:
    """The ddpm kind `config` trains: config.model's network, ddpm.schedule and ddpm.timesteps (one-line
    ConfigErrors for bad values)."""
    cfg = config.ddpm
    if not isinstance(cfg.schedule, str) or cfg.schedule not in diffusion.SCHEDULES:
        raise errors.ConfigError(f"ddpm.schedule={cfg.schedule!r}: expected one of {', '.join(diffusion.SCHEDULES)}")
    if isinstance(cfg.timesteps, bool) or not isinstance(cfg.timesteps, int) or cfg.timesteps < 2:
        raise errors.ConfigError(f'ddpm.timesteps={cfg.timesteps!r}: must be an integer >= 2 (the diffusion steps T)')
    kind = kinds.Diffusion.from_model_config(config.model, schedule=cfg.schedule, timesteps=cfg.timesteps)
    kind.module  # noqa: B018 - builds the network now: an unknown model or field fails here
    return kind


def check(config: ml_collections.ConfigDict) -> Options:
    """Static checks of `config.ddpm` and the shared sections (touches no files); the kind trained."""
    kind = kind_of(config)
    init = config.ddpm.init
    if init is not None and not isinstance(init, str):
        raise errors.ConfigError(f'ddpm.init={init!r}: expected a ddpm export directory or stage name (or None)')
    training.check_training(config, kind_of)
    if config.flow.time != 'uniform':
        raise errors.ConfigError(f"flow.time={config.flow.time!r}: ddpm draws its own times, k uniform in {{1..T}} "
                                 "and t = 1 - k / T (T = ddpm.timesteps); leave flow.time='uniform'")
    return Options(kind=kind)


def draw(rng: jax.Array, x1: jax.Array, timesteps: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(t, eps, dropout key) of a batch x1: k uniform in {1..T} per example, t = 1 - k / T (float32),
    eps ~ N(0, I) of x1's shape."""
    k_k, k_eps, k_drop = jax.random.split(rng, 3)
    k = jax.random.randint(k_k, (x1.shape[0],), 1, timesteps + 1)
    t = 1.0 - k.astype(jnp.float32) / timesteps
    return t, jax.random.normal(k_eps, x1.shape, jnp.float32), k_drop


def loss_fn(params, batch: dict, rng: jax.Array, ctx: training.Context):
    """x_t = alpha(t) x1 + sigma(t) eps at the times of `draw`, the flow's loss on eps_hat(x_t, t) against eps
    (default: mean (eps_hat - eps)^2); x1_hat = (x_t - sigma eps_hat) / alpha for the LPIPS losses."""
    x1, process = batch['x1'], ctx.options.kind.process
    t, eps, k_drop = draw(rng, x1, process.timesteps)
    x_t = process.marginal(x1, eps, t)
    eps_hat = ctx.apply(params, x_t, t, k_drop, label=ctx.label(batch))
    return ctx.flow.field_loss(eps_hat, eps, t=t, x1=x1, x1_hat=diffusion.data_estimate(process, x_t, eps_hat, t),
                               perceptual=ctx.distance_fn())


def _init_params(config: ml_collections.ConfigDict, kind: kinds.Diffusion):
    """The params of `ddpm.init`: a ddpm export of this run's network, schedule and timesteps."""
    path = config.ddpm.init
    try:
        params, meta = checkpoint.load_export(path)
    except errors.UserError as e:
        raise errors.ConfigError(f'ddpm.init: {e}') from None
    given = kinds.from_meta(meta, 'ddpm.init')
    if not isinstance(given, kinds.Diffusion):
        raise errors.ConfigError(f'ddpm.init: {path} holds a model of kind {given.name!r}; a ddpm run starts from '
                                 f'a ddpm export (kind {kinds.Diffusion.name!r})')
    training.check_network(path, 'ddpm.init', meta, config)
    if (given.schedule, given.timesteps) != (kind.schedule, kind.timesteps):
        raise errors.ConfigError(f'ddpm.init: {path} was trained with schedule={given.schedule!r}, '
                                 f'timesteps={given.timesteps}; this run has ddpm.schedule={kind.schedule!r}, '
                                 f'ddpm.timesteps={kind.timesteps}')
    return params


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains the eps network on `config.data` (from `ddpm.init` or fresh), exports its EMA weights as a
    ddpm model, evaluates them."""
    options = check(config)
    init = _init_params(config, options.kind) if config.ddpm.init else None

    def batches(mesh):
        return datasets.make_batches(config, mesh, config.train.batch_size, config.seed)

    return training.fit(config, workdir, METHOD, loss_fn=loss_fn, batches=batches, init_params=init, options=options,
                        kind=options.kind)


METHOD = method.Method(name='ddpm', run=run, check=check, section=defaults, references=('ddpm.init',))
