"""What every training method shares: the loss context, the static checks of the shared
sections, loading an export, and `fit` (train, export, evaluate).

A training method's module has a pure `loss_fn(params, batch, rng, ctx) -> (loss, metrics)`,
a `check(config) -> options` and a `run(config, workdir)` that calls `fit`."""

import json
from collections.abc import Callable
from typing import Any

import flax
import jax
import ml_collections
from etils import epath

from flowjax import checkpoint, errors, evaluate, models, sharding, train
from flowjax.data import datasets
from flowjax.models import kinds
from flowjax.flows import objective
from flowjax.methods import method as method_lib


@flax.struct.dataclass
class Context:
    """What a loss needs besides params, batch and rng. Passed to the jitted step as an
    argument: array fields (a teacher's weights) are traced, the rest is static."""

    apply: Callable[..., jax.Array] = flax.struct.field(pytree_node=False)  # (params, x, t, dropout_rng=None)
    source: Callable[[jax.Array, tuple[int, ...]], jax.Array] = flax.struct.field(pytree_node=False)
    flow: objective.Flow = flax.struct.field(pytree_node=False, default=objective.Flow())  # config.flow
    conditional: bool = flax.struct.field(pytree_node=False, default=False)  # the model takes class labels
    options: Any = flax.struct.field(pytree_node=False, default=None)  # the method's check() result (frozen)
    # The teacher: its kind (samples, inverts) and params; `teacher_apply` is its velocity network's
    # `apply` when it is a velocity field (None otherwise).
    teacher_kind: Any = flax.struct.field(pytree_node=False, default=None)
    teacher_apply: Callable[..., jax.Array] | None = flax.struct.field(pytree_node=False, default=None)
    teacher_params: Any = None
    # A learned distance (LPIPS): `perceptual(perceptual_params, x, y) -> (B,)`.
    perceptual: Callable[..., jax.Array] | None = flax.struct.field(pytree_node=False, default=None)
    perceptual_params: Any = None

    def label(self, batch: dict) -> jax.Array | None:
        """The batch's class labels if the model is class-conditional, else None."""
        return batch['label'] if self.conditional else None

    @property
    def t_eps(self) -> float:
        """The flow's smallest time: sampling integrates from it, one-step students start there."""
        return self.flow.t_eps

    def distance_fn(self) -> objective.Perceptual | None:
        """LPIPS as `(x, y) -> (B,)` for the flow's losses, or None when none is loaded."""
        if self.perceptual is None:
            return None
        return lambda x, y: self.perceptual(self.perceptual_params, x, y)


def flow(config: ml_collections.ConfigDict) -> objective.Flow:
    """The objective `config.flow` describes (one-line ConfigErrors)."""
    return objective.from_config(config.flow, data_kind=config.data.kind)


def check_lpips(config: ml_collections.ConfigDict) -> None:
    """When the flow's loss uses LPIPS: `config.lpips` is valid and its VGG16 weights file exists."""
    if method_lib.flow_uses_lpips(config):
        from flowjax.metrics import lpips

        # a missing weights file goes through `load_perceptual` (tests stand random weights in there)
        lpips.check_config(config.lpips, datasets.sample_shape(config), load=lambda _: load_perceptual(config))


def load_perceptual(config: ml_collections.ConfigDict) -> tuple[Callable[..., jax.Array], Any]:
    """(distance fn, variables) of LPIPS as `config.lpips` describes it."""
    from flowjax.metrics import lpips

    module, variables = lpips.from_config(config.lpips)
    return lpips.distance_fn(module), variables


def check_training(config: ml_collections.ConfigDict, kind_of: Callable[[ml_collections.ConfigDict], Any] | None = None
                   ) -> None:
    """Static checks of a training method's config: data, model, train and eval fields. `kind_of(config)`
    is the model kind it trains (default `kinds.from_config`: the velocity field of config.model), whose
    evaluation needs at least one sampler of eval.samplers that applies to it.

    Touches no files, so a pipeline can check every stage before it runs the first.
    """
    models.build(config.model)
    if models.num_classes(config.model) and config.data.kind != 'image':
        raise errors.ConfigError(f'model.num_classes={config.model.num_classes}: class labels need data.kind=\'image\'')
    train.validate(config.train, sharding.data_mesh())
    flow(config)
    check_lpips(config)
    evaluate.check_data(config)
    samplers = evaluate.parse_samplers(config)
    kind = (kind_of or kinds.from_config)(config)
    if samplers:  # a guidance scale the trained model cannot take fails now, not after training
        kinds.guided(kind, config.eval.get('guidance', 1.0), 'eval.guidance', 'the model this method trains')
    if samplers and not any(kind.supports(s) for s in samplers):
        raise errors.ConfigError(f"eval.samplers={tuple(config.eval.samplers)!r}: none applies to a model of kind "
                                 f'{kind.name!r}, which this method trains')
    if config.eval.get('preservation', 0):
        raise errors.ConfigError(f'eval.preservation={config.eval.preservation}: only the evaluate method scores '
                                 'coupling preservation (set it with eval.couplings in an evaluate stage)')


# Model fields that change how a network trains, not its parameters: a student may differ from
# the export it starts from in these (Simple ReFlow trains the student with less dropout).
TRAINING_ONLY_FIELDS = ('dropout',)


def architecture(model: dict) -> dict:
    """A network config (an export's meta 'model') without its TRAINING_ONLY_FIELDS, as JSON values, a field it
    leaves out at the network's default: two configs of one network compare equal however many fields they list
    (an imported teacher's meta lists fewer than a recipe may)."""
    full = json.loads(json.dumps({**models.defaults(model.get('name')), **model}, default=str))
    return {k: v for k, v in full.items() if k not in TRAINING_ONLY_FIELDS}


def check_network(path: str, field: str, meta: dict, config: ml_collections.ConfigDict) -> None:
    """A one-line ConfigError unless the network exported in `path` (its `meta`) is config.model's, up
    to TRAINING_ONLY_FIELDS such as dropout: a run starting from that export's weights."""
    if architecture(meta['model']) != architecture(json.loads(config.model.to_json())):
        raise errors.ConfigError(
            f'{field}: the model exported in {path} ({meta["model"]}) differs from model ({config.model.to_json()})')


def load_model(path: str, field: str, config: ml_collections.ConfigDict | None = None) -> kinds.Model:
    """The model (kind, params, meta) of an export; with `config` (a student starting from it), it
    must be a velocity field whose network is config.model's (up to TRAINING_ONLY_FIELDS such as dropout)."""
    if not path:
        raise errors.ConfigError(f'{field}: an export directory (or pipeline stage name) is required')
    params, meta = checkpoint.load_export(path)
    kind = kinds.from_meta(meta, field)
    if config is not None and not isinstance(kind, kinds.VelocityField):
        raise errors.ConfigError(f'{field}: {path} holds a model of kind {kind.name!r}; a student starts from a '
                                 f'velocity field (kind {kinds.VelocityField.name!r})')
    if config is not None:
        check_network(path, field, meta, config)
    return kinds.Model(kind, params, meta)


def context(config: ml_collections.ConfigDict, mesh, *, options: Any = None,
            teacher: kinds.Model | None = None, kind: Any = None) -> Context:
    """The loss context of `config.model` (or the network of `kind`) and `config.flow` on `mesh`: the
    `teacher` model and LPIPS (`config.lpips`, when the flow's loss uses it) placed on every device."""
    kind = kinds.from_config(config) if kind is None else kind
    ctx = Context(apply=kind.apply, source=datasets.noise(config), flow=flow(config),
                  options=options, conditional=kind.num_classes > 0)
    if teacher is not None:
        velocity = isinstance(teacher.kind, kinds.VelocityField | kinds.VelocityFunction)
        ctx = ctx.replace(teacher_kind=teacher.kind, teacher_apply=teacher.kind.apply if velocity else None,
                          teacher_params=jax.device_put(teacher.params, sharding.replicated(mesh)))
    if ctx.flow.uses_lpips:
        fn, variables = load_perceptual(config)
        ctx = ctx.replace(perceptual=fn, perceptual_params=jax.device_put(variables, sharding.replicated(mesh)))
    return ctx


def fit(config: ml_collections.ConfigDict, workdir: str, method: method_lib.Method, *, loss_fn,
        batches: Callable[[Any], Callable[[int], dict]], init_params: Any = None, options: Any = None,
        teacher: kinds.Model | None = None, kind: Any = None) -> dict:
    """Trains `config.model` with `loss_fn` and evaluates its EMA weights (`evaluate.evaluate`).

    The caller (the `method` running) has checked the config (`check_training` and its own
    section); a resumed run must match the method's `identity` of the config.
    `batches(mesh)` builds the step -> global batch function; `teacher` is a loaded model; `kind` the
    model kind trained (default: the velocity field of config.model).
    """
    mesh = sharding.data_mesh()
    kind = kinds.from_config(config) if kind is None else kind
    ctx = context(config, mesh, options=options, teacher=teacher, kind=kind)
    if init_params is not None:
        init_params = jax.device_put(init_params, sharding.replicated(mesh))
    state = train.train(config, workdir, kind=kind, loss_fn=loss_fn, ctx=ctx, batches=batches(mesh),
                        sample_shape=datasets.sample_shape(config), mesh=mesh, init_params=init_params,
                        identity=method.identity(config), defaults=method.default_identity())
    if not config.eval.samplers:
        return {}
    name = config.name or config.method
    return evaluate.evaluate(config, epath.Path(workdir), {name: kinds.Model(kind, state.ema_params)})
