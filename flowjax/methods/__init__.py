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
from flowjax.data import datasets
from flowjax.flows import losses


@flax.struct.dataclass
class Context:
    """What a loss needs besides params, batch and rng. Passed to the jitted step as an
    argument: array fields (a teacher's weights) are traced, the rest is static."""

    apply: Callable[..., jax.Array] = flax.struct.field(pytree_node=False)  # (params, x, t, dropout_rng=None)
    source: Callable[[jax.Array, tuple[int, ...]], jax.Array] = flax.struct.field(pytree_node=False)
    t_eps: float = flax.struct.field(pytree_node=False, default=1e-3)
    conditional: bool = flax.struct.field(pytree_node=False, default=False)  # the model takes class labels
    options: Any = flax.struct.field(pytree_node=False, default=None)  # a method's hashable settings
    teacher_apply: Callable[..., jax.Array] | None = flax.struct.field(pytree_node=False, default=None)
    teacher_params: Any = None
    # A learned distance (LPIPS): `perceptual(perceptual_params, x, y) -> (B,)`.
    perceptual: Callable[..., jax.Array] | None = flax.struct.field(pytree_node=False, default=None)
    perceptual_params: Any = None

    def label(self, batch: dict) -> jax.Array | None:
        """The batch's class labels if the model is class-conditional, else None."""
        return batch['label'] if self.conditional else None

    def distance(self, name: str, x: jax.Array, y: jax.Array, c: float | None = None) -> jax.Array:
        """Per-example distance `name` ('l2', 'pseudo_huber' or 'lpips') between x and y: (B,)."""
        if name == 'lpips':
            return self.perceptual(self.perceptual_params, x, y)
        return losses.PER_EXAMPLE[name](x, y, c)


DISTANCES = (*losses.PER_EXAMPLE, 'lpips')


def check_distance(config: ml_collections.ConfigDict, field: str) -> None:
    """`config.<field>` names a distance; 'lpips' needs image data and the VGG16 weights file."""
    section, name = field.split('.')
    value = config[section][name]
    if value not in DISTANCES:
        raise errors.ConfigError(f"{field}={value!r}: expected one of {', '.join(DISTANCES)}")
    if value == 'lpips':
        if config.data.kind != 'image':
            raise errors.ConfigError(f"{field}='lpips' needs data.kind='image'")
        if config.lpips.pool not in ('max', 'avg'):
            raise errors.ConfigError(f"lpips.pool={config.lpips.pool!r}: expected 'max' or 'avg'")
        size = config.lpips.resize or min(datasets.sample_shape(config)[:2])
        if size < 16:  # VGG16 pools four times before its last tap
            raise errors.ConfigError(f'lpips.resize={config.lpips.resize}: LPIPS needs images of at least 16x16; '
                                     'set lpips.resize (e.g. 64)')
        if not config.lpips.vgg_weights or not epath.Path(config.lpips.vgg_weights).exists():
            load_perceptual(config)  # raises the one-line error saying which file and where to get it


def load_perceptual(config: ml_collections.ConfigDict) -> tuple[Callable[..., jax.Array], Any]:
    """(distance fn, variables) of LPIPS as `config.lpips` describes it."""
    from flowjax.metrics import lpips

    module, variables = lpips.load(config.lpips.vgg_weights, config.lpips.head_weights,
                                   resize=config.lpips.resize, pool=config.lpips.pool, field='lpips.vgg_weights')
    return lpips.distance_fn(module), variables


def check_training(config: ml_collections.ConfigDict) -> None:
    """Static checks of a training method's config: data, model, train and eval fields.

    Touches no files, so a pipeline can check every stage before it runs the first.
    """
    models.build(config.model)
    if models.num_classes(config.model) and config.data.kind != 'image':
        raise errors.ConfigError(f'model.num_classes={config.model.num_classes}: class labels need data.kind=\'image\'')
    train.validate(config.train, sharding.data_mesh())
    evaluate.check_data(config)


def load_model(path: str, field: str, config: ml_collections.ConfigDict | None = None):
    """(module, params, meta) of an export; with `config`, its model must equal config.model."""
    if not path:
        raise errors.ConfigError(f'{field}: an export directory (or pipeline stage name) is required')
    params, meta = checkpoint.load_export(path)
    if config is not None and meta['model'] != json.loads(config.model.to_json()):
        raise errors.ConfigError(
            f'{field}: the model exported in {path} ({meta["model"]}) differs from model ({config.model.to_json()})')
    return models.build(ml_collections.ConfigDict(meta['model'])), params, meta


def context(config: ml_collections.ConfigDict, mesh, *, options: Any = None, teacher: tuple[Any, Any] | None = None,
            perceptual: bool = False) -> Context:
    """The loss context of `config.model` on `mesh`: `teacher` (module, params) and LPIPS
    (`perceptual`, from `config.lpips`) placed on every device."""
    module = models.build(config.model)
    ctx = Context(apply=models.apply_fn(module), source=datasets.noise(config),
                  t_eps=config.flow.t_eps, options=options, conditional=models.num_classes(config.model) > 0)
    if teacher is not None:
        ctx = ctx.replace(teacher_apply=models.apply_fn(teacher[0]),
                          teacher_params=jax.device_put(teacher[1], sharding.replicated(mesh)))
    if perceptual:
        fn, variables = load_perceptual(config)
        ctx = ctx.replace(perceptual=fn, perceptual_params=jax.device_put(variables, sharding.replicated(mesh)))
    return ctx


def fit(config: ml_collections.ConfigDict, workdir: str, *, loss_fn, batches: Callable[[Any], Callable[[int], dict]],
        init_params: Any = None, options: Any = None, teacher: tuple[Any, Any] | None = None,
        perceptual: bool = False) -> dict:
    """Trains `config.model` with `loss_fn` and evaluates its EMA weights (`evaluate.evaluate`).

    The caller has checked the config (`check_training` and its own section).
    `batches(mesh)` builds the step -> global batch function; `teacher` is (module, params);
    `perceptual` loads LPIPS (`config.lpips`) into the context.
    """
    mesh = sharding.data_mesh()
    module = models.build(config.model)
    ctx = context(config, mesh, options=options, teacher=teacher, perceptual=perceptual)
    if init_params is not None:
        init_params = jax.device_put(init_params, sharding.replicated(mesh))
    state = train.train(config, workdir, module=module, loss_fn=loss_fn, ctx=ctx, batches=batches(mesh),
                        sample_shape=datasets.sample_shape(config), mesh=mesh, init_params=init_params)
    if not config.eval.samplers:
        return {}
    name = config.name or config.method
    classes = (models.num_classes(config.model),) if ctx.conditional else ()
    return evaluate.evaluate(config, epath.Path(workdir), {name: (ctx.apply, state.ema_params, *classes)})
