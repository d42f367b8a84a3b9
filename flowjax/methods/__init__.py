"""Training objectives. Each method module has a pure `loss_fn(params, batch, rng, ctx)` and a
`run(config, workdir)` that main dispatches to."""

import json
from collections.abc import Callable
from typing import Any

import flax
import jax
import ml_collections
from etils import epath

from flowjax import checkpoint, errors, evaluate, models, sharding, train
from flowjax.data import toy2d


@flax.struct.dataclass
class Context:
    """What a loss needs besides params, batch and rng. Passed to the jitted step as an
    argument: array fields (a teacher's weights) are traced, the rest is static."""

    apply: Callable[..., jax.Array] = flax.struct.field(pytree_node=False)  # (params, x, t, dropout_rng=None)
    source: Callable[[jax.Array, tuple[int, ...]], jax.Array] = flax.struct.field(pytree_node=False)
    t_eps: float = flax.struct.field(pytree_node=False, default=1e-3)
    options: Any = flax.struct.field(pytree_node=False, default=None)  # a method's hashable settings
    teacher_apply: Callable[..., jax.Array] | None = flax.struct.field(pytree_node=False, default=None)
    teacher_params: Any = None


def check_training(config: ml_collections.ConfigDict) -> None:
    """Static checks of a training method's config: data, model, train and eval fields.

    Touches no files, so a pipeline can check every stage before it runs the first.
    """
    toy2d.check_config(config)
    models.build(config.model)
    train.validate(config.train, sharding.data_mesh())
    evaluate.parse_samplers(config)


def load_model(path: str, field: str, config: ml_collections.ConfigDict | None = None):
    """(module, params, meta) of an export; with `config`, its model must equal config.model."""
    if not path:
        raise errors.ConfigError(f'{field}: an export directory (or pipeline stage name) is required')
    params, meta = checkpoint.load_export(path)
    if config is not None and meta['model'] != json.loads(config.model.to_json()):
        raise errors.ConfigError(
            f'{field}: the model exported in {path} ({meta["model"]}) differs from model ({config.model.to_json()})')
    return models.build(ml_collections.ConfigDict(meta['model'])), params, meta


def fit(config: ml_collections.ConfigDict, workdir: str, *, loss_fn, batches: Callable[[Any], Callable[[int], dict]],
        init_params: Any = None, options: Any = None, teacher: tuple[Any, Any] | None = None) -> dict:
    """Trains `config.model` with `loss_fn` and evaluates its EMA weights on the toy data.

    The caller has checked the config (`check_training` and its own section).
    `batches(mesh)` builds the step -> global batch function; `teacher` is (module, params).
    """
    mesh = sharding.data_mesh()
    module = models.build(config.model)
    ctx = Context(apply=models.apply_fn(module), source=toy2d.source_sampler(config.data.source),
                  t_eps=config.flow.t_eps, options=options)
    if teacher is not None:
        ctx = ctx.replace(teacher_apply=models.apply_fn(teacher[0]),
                          teacher_params=jax.device_put(teacher[1], sharding.replicated(mesh)))
    if init_params is not None:
        init_params = jax.device_put(init_params, sharding.replicated(mesh))
    state = train.train(config, workdir, module=module, loss_fn=loss_fn, ctx=ctx, batches=batches(mesh),
                        sample_shape=(2,), mesh=mesh, init_params=init_params)
    if not config.eval.samplers:
        return {}
    name = config.name or config.method
    return evaluate.evaluate_toy(config, epath.Path(workdir), {name: (ctx.apply, state.ema_params)})
