"""Weight transfer (docs/methods.md, Weight transfer (plug-and-play)): the change training made to
a base model (`tuned` - `base`, e.g. a PeRFlow student of the base teacher) added to another model
fine-tuned from the same base (`target`), without training:

    params = target + scale * (tuned - base)

exported with the kind and network of `tuned` (which decides how it samples), then evaluated.
"""

import math

import jax
import ml_collections
import numpy as np
from etils import epath
from ml_collections import config_dict

from flowjax import checkpoint, errors, evaluate
from flowjax.methods import method, training
from flowjax.models import kinds

FIELDS = ('base', 'tuned', 'target')


def defaults() -> ml_collections.ConfigDict:
    """`config.transfer`: three exports (or stage names) and the scale of the change."""
    c = ml_collections.ConfigDict()
    c.base = config_dict.placeholder(str)  # the model both others were trained from
    c.tuned = config_dict.placeholder(str)  # trained from base; its kind and network are the result's
    c.target = config_dict.placeholder(str)  # fine-tuned from base; receives the change
    c.scale = 1.0
    return c


def check(config: ml_collections.ConfigDict) -> float:
    """Static checks of `config.transfer` and the data / eval fields; returns the scale."""
    cfg = config.transfer
    for field in FIELDS:
        if not isinstance(cfg[field], str) or not cfg[field]:
            raise errors.ConfigError(f'transfer.{field}: an export directory (or pipeline stage name) is required')
    scale = cfg.scale
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise errors.ConfigError(f'transfer.scale={scale!r}: must be a finite number')
    evaluate.check_data(config)
    return float(scale)


def _leaves(model: kinds.Model) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(model.params)}


def _check_same_tree(base: kinds.Model, other: kinds.Model, field: str) -> None:
    """`other`'s parameters have `base`'s names and shapes; the first mismatch in one line."""
    a, b = _leaves(base), _leaves(other)
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            where = 'transfer.base' if name in a else f'transfer.{field}'
            raise errors.ConfigError(f'transfer.{field}: parameter {name} is only in {where}; the three exports '
                                     'must have the same parameters (models trained from transfer.base)')
        if np.shape(a[name]) != np.shape(b[name]):
            raise errors.ConfigError(f'transfer.{field}: parameter {name} has shape {np.shape(b[name])}, '
                                     f'transfer.base has {np.shape(a[name])}')


def _source(path: str, model: kinds.Model) -> dict:
    return {'path': path, 'method': model.meta.get('method'), 'step': model.meta.get('step')}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Exports target + scale * (tuned - base) in `<workdir>/export` (kept when a rerun makes the same
    transfer, refused when it would replace another) and evaluates it when eval.samplers is set."""
    scale, cfg, workdir = check(config), config.transfer, epath.Path(workdir)
    base, tuned, target = (training.load_model(cfg[f], f'transfer.{f}') for f in FIELDS)
    _check_same_tree(base, tuned, 'tuned')
    _check_same_tree(base, target, 'target')
    if (base.kind.name != target.kind.name
            or training.architecture(base.meta['model']) != training.architecture(target.meta['model'])):
        raise errors.ConfigError(f'transfer.target: {cfg.target} holds a model of kind {target.kind.name!r} '
                                 f"({target.meta['model']}), transfer.base one of kind {base.kind.name!r} "
                                 f"({base.meta['model']}); fine-tune the target from the base")
    samplers = evaluate.parse_samplers(config)
    if samplers and not any(tuned.kind.supports(s) for s in samplers):
        raise errors.ConfigError(f"eval.samplers={tuple(config.eval.samplers)!r}: none applies to a model of kind "
                                 f'{tuned.kind.name!r} (transfer.tuned)')
    record = {'scale': scale, **{f: _source(cfg[f], m) for f, m in zip(FIELDS, (base, tuned, target))}}
    if checkpoint.is_exported(workdir):
        existing = checkpoint.load_export(workdir)
        if existing[1].get('transfer') != record:
            raise errors.UserError(f'{checkpoint.export_dir(workdir)}: holds a transfer of other exports or scale '
                                   f"({existing[1].get('transfer')}); use a new workdir or remove that directory")
        params = existing[0]
    else:
        params = jax.tree.map(lambda t, a, b: np.asarray(t + scale * (a - b), dtype=np.asarray(t).dtype),
                              target.params, tuned.params, base.params)
        # the tuned model's meta (kind, network, flow, sample shape, step), the sources recorded
        meta = {**tuned.meta, 'method': config.method, 'transfer': record}
        checkpoint.export(workdir, params, meta)
    if not samplers:
        return {}
    name = config.name or config.method
    return evaluate.evaluate(config, workdir, {name: kinds.Model(tuned.kind, params)})


# Reads the data, the flow's t_eps and `eval` to evaluate the result, not the model or training sections.
METHOD = method.Method(name='transfer', run=run, check=check, section=defaults,
                       references=tuple(f'transfer.{f}' for f in FIELDS), reads=('data', 'flow', 'eval'),
                       lpips=method.eval_uses_lpips)
