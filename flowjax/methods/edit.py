"""Class-conditional image editing by inversion (docs/methods.md, Editing (method edit)).

A real labelled image x1 of class a is inverted to noise with a sampler at guidance 1 (the plain
conditional model, label a), and that noise is regenerated with a target label b at guidance w with
the same sampler:

    z  = kind.invert(x1, label=a)                     (guidance 1)
    x' = guided(kind, w).sample(z, label=b)           (target b, guidance w)

For every sampler of `edit.samplers` and scale of `edit.guidance`, `edit.count` held-out images
are edited to the targets of `edit.targets` and scored: the shipped digits classifier's accuracy
on the edits (8x8 digits only), PSNR, RMSE (uint8 units) and, with eval.lpips, LPIPS of each edit
against its source, and the NFE of both solves. Writes edit.json, edit.md and edit.png. With several
processes each edits and scores the sources its devices hold; only the per-edit scores (and the edits the
figure shows) are gathered.
"""

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from ml_collections import config_dict

from flowjax import errors, sharding
from flowjax.data import datasets
from flowjax.evaluation import fidelity, images, job, report
from flowjax.flows import solvers
from flowjax.methods import method, training
from flowjax.models import kinds

TARGETS = ('all', 'next')  # the named forms of edit.targets (else a tuple of class ids)
SCORES = ('accuracy', 'psnr', 'rmse', 'lpips')  # the scores of edits, in table order


def defaults() -> ml_collections.ConfigDict:
    """`config.edit`: the model, samplers, guidance scales and what is edited to what."""
    c = ml_collections.ConfigDict()
    c.model = config_dict.placeholder(str)  # an export (or pipeline stage) of a class-conditional model
    c.samplers = ('euler@8',)  # each inverts and regenerates
    c.guidance = (1.0, 2.0)  # regeneration scales; inversion is always at 1
    c.count = 16  # held-out source images (with their labels)
    # 'all': every class; 'next': (label + 1) mod num_classes; or a tuple of class ids
    c.targets = config_dict.FieldReference('all', field_type=object)
    c.grid = 8  # sources shown in edit.png
    return c


@dataclasses.dataclass(frozen=True)
class Options:
    """The checked `config.edit`: samplers parsed, scales as floats, targets 'all', 'next' or class ids."""

    model: str
    samplers: tuple[solvers.Sampler, ...]
    guidance: tuple[float, ...]
    count: int
    targets: str | tuple[int, ...]
    grid: int


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise errors.ConfigError(f'{field}={value!r}: expected an integer >= 1')
    return value


def _targets(value: Any) -> str | tuple[int, ...]:
    """edit.targets checked: 'all', 'next', or a non-empty tuple of distinct class ids >= 0."""
    if isinstance(value, str) and value in TARGETS:
        return value
    ids = tuple(value) if isinstance(value, (tuple, list)) else None
    if (not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
            or len(set(ids)) != len(ids)):
        raise errors.ConfigError(f"edit.targets={value!r}: expected 'all', 'next' or a non-empty tuple of distinct "
                                 'class ids >= 0')
    return ids


def check(config: ml_collections.ConfigDict) -> Options:
    """Static checks of `config.edit`, the data (labelled images) and the eval fields edit reads."""
    if config.data.kind != 'image':
        raise errors.ConfigError(f"data.kind={config.data.kind!r}: edit edits labelled images (data.kind='image')")
    datasets.check(config)
    cfg = config.edit
    if not isinstance(cfg.model, str) or not cfg.model:
        raise errors.ConfigError('edit.model: an export directory (or pipeline stage name) of a class-conditional '
                                 'model is required')
    specs = cfg.samplers
    if (not isinstance(specs, (tuple, list)) or not specs or not all(isinstance(s, str) for s in specs)
            or len(set(specs)) != len(specs)):
        raise errors.ConfigError(f"edit.samplers={specs!r}: expected a non-empty tuple of distinct sampler specs "
                                 "(e.g. ('euler@8',))")
    samplers = tuple(job.parse_samplers(config, specs, 'edit.samplers'))
    scales = cfg.guidance
    if not isinstance(scales, (tuple, list)) or not scales:
        raise errors.ConfigError(f'edit.guidance={scales!r}: expected a non-empty tuple of guidance scales, finite '
                                 'numbers >= 0 (1: no guidance)')
    guidance = tuple(kinds.check_guidance(w, 'edit.guidance') for w in scales)
    if len(set(guidance)) != len(guidance):
        raise errors.ConfigError(f'edit.guidance={tuple(scales)!r}: a scale is listed twice')
    count = _positive_int(cfg.count, 'edit.count')
    if count > (available := datasets.num_images(config)):
        raise errors.ConfigError(f'edit.count={count}: more than the {available} images of data.image')
    grid = _positive_int(cfg.grid, 'edit.grid')
    targets = _targets(cfg.targets)
    sharding.check_batch_size(config.eval.batch_size, sharding.data_mesh(), 'eval.batch_size')
    lpips = config.eval.get('lpips', False)
    if not isinstance(lpips, bool):
        raise errors.ConfigError(f'eval.lpips={lpips!r}: expected True or False')
    if lpips:
        from flowjax.metrics import lpips as lpips_lib

        lpips_lib.check_config(config.lpips, datasets.sample_shape(config))
    return Options(cfg.model, samplers, guidance, count, targets, grid)


def uses_lpips(config: ml_collections.ConfigDict) -> bool:
    """Whether edits are scored by LPIPS (eval.lpips; then the `lpips` section is read)."""
    return 'eval' in config and config.eval.get('lpips') is True


# ----------------------------------------------------------------------------------------------- the edit


def plain(kind: kinds.Kind) -> kinds.Kind:
    """`kind` without guidance (scale 1): what inversion runs."""
    return dataclasses.replace(kind, guidance=1.0) if kind.guidance != 1.0 else kind


def invert(kind: kinds.Kind, params: Any, x1: jax.Array, source: jax.Array, sampler: solvers.Sampler, *,
           eps: float) -> tuple[jax.Array, jax.Array]:
    """(noise, nfe): images x1 of classes `source` inverted with `sampler` at guidance 1."""
    return job.kind_function(plain(kind), 'invert', sampler, eps)(params, x1, source)


def regenerate(kind: kinds.Kind, params: Any, z: jax.Array, target: jax.Array, sampler: solvers.Sampler, *,
               eps: float, guidance: float = 1.0, name: str = 'the model') -> tuple[jax.Array, jax.Array]:
    """(images, nfe): noise z sampled with classes `target` at `guidance` (the NFE counts guidance's calls);
    a scale other than 1 on a model without a null label is the one-line error of `kinds.guided`."""
    guided = kinds.guided(plain(kind), guidance, 'edit.guidance', name)
    return job.kind_function(guided, 'sample', sampler, eps)(params, z, target)


def edit(kind: kinds.Kind, params: Any, x1: jax.Array, source: jax.Array, target: jax.Array,
         sampler: solvers.Sampler, *, eps: float, guidance: float = 1.0,
         name: str = 'the model') -> tuple[jax.Array, jax.Array, jax.Array]:
    """(edits, invert nfe, regenerate nfe): x1 of classes `source` inverted at guidance 1 and regenerated
    with classes `target` at `guidance`, the same `sampler` both ways."""
    z, nfe_in = invert(kind, params, x1, source, sampler, eps=eps)
    x, nfe_out = regenerate(kind, params, z, target, sampler, eps=eps, guidance=guidance, name=name)
    return x, nfe_in, nfe_out


def target_columns(targets: str | tuple[int, ...], labels: np.ndarray, classes: int) -> list[np.ndarray]:
    """The target class of every source per column: 'all' one column per class 0..K-1, 'next' one column
    (label + 1) mod K, a tuple one column per class id."""
    labels = np.asarray(labels, np.int32)
    if targets == 'next':
        return [(labels + 1) % classes]
    ids = range(classes) if targets == 'all' else targets
    return [np.full_like(labels, c) for c in ids]


def column_titles(targets: str | tuple[int, ...], classes: int) -> list[str]:
    """The grid's column titles after the source: the target class of each column."""
    if targets == 'next':
        return ['to y+1']
    return [f'to {c}' for c in (range(classes) if targets == 'all' else targets)]


# ----------------------------------------------------------------------------------------------- the job


def is_digits(config: ml_collections.ConfigDict, shape: Sequence[int]) -> bool:
    """Whether the shipped digits classifier can read the images: data.image is 'digits' (8x8x1)."""
    return config.data.image.get('name') == 'digits' and tuple(shape) == (8, 8, 1)


class _Classifier:
    """The shipped digits classifier on sharded chunks: whether it predicts each image's class."""

    def __init__(self, mesh):
        from flowjax.metrics import digits_classifier

        module, variables = digits_classifier.load()
        self._variables = jax.device_put(variables, sharding.replicated(mesh))
        self._fn = jax.jit(lambda v, x: module.apply(v, x).argmax(-1))

    def hits(self, x: jax.Array, classes: jax.Array, valid: int) -> np.ndarray:
        """1.0 where the predicted class of image i < `valid` is classes[i], else 0.0 (each process its rows)."""
        return sharding.map_rows(lambda p, c: (p == c).astype(np.float64), self._fn(self._variables, x), classes,
                                 count=valid)


def _load(path: str) -> kinds.Model:
    """The class-conditional model of edit.model, else a one-line UserError."""
    model = training.load_model(path, 'edit.model')
    if not model.kind.num_classes:
        raise errors.UserError(f'edit.model={path}: the model (kind {model.kind.name!r}) is not class-conditional; '
                               'editing needs one trained with model.num_classes > 0')
    return model


def _suite(config: ml_collections.ConfigDict, workdir: epath.Path, count: int, options: Options) -> images.ImageSuite:
    """The image suite whose held-out images, chunks and compare the edits use: no Frechet metric (nothing
    here samples from noise), chunks of eval.batch_size or fewer (count rounded up to the device count),
    LPIPS when eval.lpips (the suite loads it for reconstructions, so the copy asks for those)."""
    c = ml_collections.ConfigDict(config.to_dict())
    devices = sharding.data_mesh().devices.size
    c.eval.metric = 'none'
    c.eval.batch_size = min(config.eval.batch_size, -(-count // devices) * devices)
    c.eval.samplers = tuple(s.key for s in options.samplers)
    c.eval.reconstruction = count if uses_lpips(config) else 0
    return images.ImageSuite(c, workdir)


def _cell(scores: dict[str, list[np.ndarray]], mask: np.ndarray) -> dict[str, Any]:
    """Means of per-pair scores over the pairs of `mask` (None where none, or not finite)."""
    out = {}
    for name, values in scores.items():
        flat = np.concatenate(values)[mask]
        out[name] = report.finite_or_none(float(np.mean(flat))) if flat.size else None
    return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Method 'edit': edits edit.count held-out images with every sampler and guidance scale; writes
    edit.json, edit.md and edit.png (process 0) and returns the result."""
    options, workdir = check(config), epath.Path(workdir)
    model = _load(options.model)
    kind, name, classes = model.kind, f'edit.model={options.model}', model.kind.num_classes
    for sampler in options.samplers:
        if not kind.supports(sampler):
            raise errors.UserError(f'edit.samplers: {sampler.key!r} does not apply to a model of kind {kind.name!r} '
                                   f'({name})')
    for w in options.guidance:
        kinds.guided(kind, w, 'edit.guidance', name)  # a scale the model cannot take fails before any work
    if isinstance(options.targets, tuple) and max(options.targets) >= classes:
        raise errors.UserError(f'edit.targets={options.targets!r}: class {max(options.targets)} is not a class of '
                               f'edit.model (num_classes={classes}: ids 0..{classes - 1})')
    workdir.mkdir(parents=True, exist_ok=True)
    suite = _suite(config, workdir, options.count, options)
    x1, labels = suite.held_out(options.count)
    labels = job.class_labels(classes, labels, name, f'data.image={config.data.image.to_dict()}')
    columns = target_columns(options.targets, labels, classes)
    digits = is_digits(config, x1.shape[1:])
    classifier = _Classifier(sharding.data_mesh()) if digits else None
    params = jax.device_put(model.params, sharding.replicated(sharding.data_mesh()))
    eps = config.flow.t_eps
    pairs = np.stack(columns, axis=1)  # (count, columns): the target of every edit
    is_edit = (pairs != labels[:, None]).reshape(-1)

    result: dict[str, Any] = {'model': options.model, 'count': options.count,
                              'targets': list(options.targets) if isinstance(options.targets, tuple)
                              else options.targets, 'num_classes': classes, 'classifier': digits,
                              'edits': int(is_edit.sum()), 'reconstructions': int((~is_edit).sum())}
    if digits:
        hits = [classifier.hits(x, y, valid) for (x, y), valid in suite.chunks([x1, labels])]
        result['source_accuracy'] = float(np.mean(np.concatenate(hits)))
    shown, results = {}, {}
    for sampler in options.samplers:
        results[sampler.key] = {}
        for w in options.guidance:
            cell, shown[(sampler.key, w)] = _edit_all(kind, params, sampler, w, eps, x1, labels, columns, suite,
                                                      classifier, is_edit, name, options.grid)
            results[sampler.key][f'{w:g}'] = cell
    result['results'] = results
    if jax.process_index() == 0:
        report._write_atomic(workdir / 'edit.json', json.dumps(result, indent=2) + '\n')
        report._write_atomic(workdir / 'edit.md', markdown(result))
        save_figure(workdir / 'edit.png', x1[:options.grid], labels[:options.grid], shown, results,
                    column_titles(options.targets, classes), pairs[:options.grid],
                    f'edit: {datasets.describe(config)}')
    sharding.barrier('flowjax-edit-report')
    return result


def _edit_all(kind, params, sampler, w, eps, x1, labels, columns, suite, classifier, is_edit, name,
              grid) -> tuple[dict[str, Any], np.ndarray]:
    """One (sampler, guidance) cell: every source edited to every column's target, in sharded chunks (each
    process its rows); (the cell, the edits of the first `grid` sources (grid, columns, H, W, C) on the host)."""
    scores: dict[str, list] = {}
    edits, nfes_in, nfes_out = [], [], []
    for (x, y, *targets), valid in suite.chunks([x1, labels, *columns]):
        z, n_in = invert(kind, params, x, y, sampler, eps=eps)
        nfes_in.append(int(n_in))
        chunk, shown = [], min(valid, grid - sum(map(len, edits)))
        for target in targets:
            out, n_out = regenerate(kind, params, z, target, sampler, eps=eps, guidance=w, name=name)
            nfes_out.append(int(n_out))
            per = dict(suite.compare(out, x, valid))
            per['rmse'] = sharding.map_rows(lambda a, b: fidelity.rmse(a, b, fidelity.UINT8_SCALE), out, x, count=valid)
            if classifier is not None:
                per['accuracy'] = classifier.hits(out, target, valid)
            for k, v in per.items():
                scores.setdefault(k, []).append(v)
            if shown > 0:
                chunk.append(sharding.head(out, shown))
        if chunk:
            edits.append(np.stack(chunk, axis=1))  # (shown, columns, ...)
    # scores were gathered chunk by chunk, column by column: back to source-major (source, column) order
    n_cols = len(columns)
    ordered = {}
    for k, values in scores.items():
        per_chunk = [np.stack(values[i * n_cols:(i + 1) * n_cols], axis=1).reshape(-1)
                     for i in range(len(values) // n_cols)]
        ordered[k] = per_chunk
    on_edits, on_recon = _cell(ordered, is_edit), _cell(ordered, ~is_edit)
    cell = {k: on_edits[k] for k in SCORES if k in on_edits}
    cell.update({f'reconstruction_{k}': on_recon[k] for k in SCORES if k in on_recon})
    n_in, n_out = job.mean_nfe(nfes_in), job.mean_nfe(nfes_out)
    cell.update({'nfe': n_in + n_out, 'invert_nfe': n_in, 'regenerate_nfe': n_out})
    return cell, np.concatenate(edits)


# ----------------------------------------------------------------------------------------------- outputs


LEGEND = (
    'Each held-out source image (class a) is inverted to noise with the sampler at guidance 1 and '
    'regenerated with the same sampler and a target class b at guidance w. Edit scores are means over the '
    'edits (b != a); reconstruction_* the same over the pairs with b = a. accuracy: fraction the shipped '
    'digits classifier assigns to the target class (8x8 digits only); psnr: 10 log10(1 / MSE) in dB of the '
    'edit against its source, images mapped from [-1, 1] to [0, 1] (higher: more of the source kept); rmse: '
    'root mean squared difference to the source in uint8 units (0..255); lpips: LPIPS to the source (with '
    'eval.lpips); nfe: network evaluations per image, inversion + regeneration (invert_nfe, regenerate_nfe), '
    'guidance counted as two calls per evaluation.')


def markdown(result: dict[str, Any]) -> str:
    """edit.md: one table, a row per (sampler, guidance), a column per score; the legend."""
    cells = [(key, w, cell) for key, by_w in result['results'].items() for w, cell in by_w.items()]
    metrics = [m for m in (*SCORES, *(f'reconstruction_{s}' for s in SCORES), 'nfe', 'invert_nfe', 'regenerate_nfe')
               if any(m in cell for _, _, cell in cells)]
    rows = [[key, w, *(report.format_value(cell.get(m)) for m in metrics)] for key, w, cell in cells]
    targets = result['targets'] if isinstance(result['targets'], str) else tuple(result['targets'])
    lines = ['# Editing report', '', LEGEND, '',
             f"{result['count']} sources, targets {targets!r} of {result['num_classes']} classes: "
             f"{result['edits']} edits, {result['reconstructions']} reconstructions.", '']
    if result['classifier']:
        lines += [f"Classifier accuracy on the real sources: {report.format_value(result['source_accuracy'])}.", '']
    else:
        lines += ['accuracy is left out: the shipped classifier reads 8x8 digits only (data.image is not digits).', '']
    lines += report._table(['sampler', 'guidance', *metrics], rows) + ['']
    return '\n'.join(lines)


def panel(sources: np.ndarray, edits: np.ndarray) -> np.ndarray:
    """One grid as uint8 pixels: a row per source (N, H, W, C), its image then its edits (N, columns, H, W, C)."""
    tiles = np.concatenate([sources[:, None], edits], axis=1)
    return images.grid(tiles.reshape(-1, *sources.shape[1:]), columns=tiles.shape[1])


def save_figure(path: epath.Path, sources: np.ndarray, labels: np.ndarray, shown: dict, results: dict,
                titles: Sequence[str], pairs: np.ndarray, title: str) -> None:
    """edit.png: one panel per (sampler, guidance), rows the shown sources, columns the source then its edit to
    each target; reconstructions (target = source class) outlined in red."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    keys = list(shown)
    rows, h, w = len(sources), *sources.shape[1:3]
    cols = 1 + len(titles)
    per_row = min(len(keys), 2)
    fig_rows = -(-len(keys) // per_row)
    fig = Figure(figsize=(per_row * (1.2 + 0.42 * cols), fig_rows * (1.0 + 0.42 * rows)), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(fig_rows, per_row, squeeze=False).reshape(-1)
    for ax, key in zip(axes, keys):
        sampler, scale = key
        tile = panel(sources, shown[key][:rows])
        ax.imshow(tile[..., 0] if tile.shape[-1] == 1 else tile, cmap='gray', vmin=0, vmax=255,
                  interpolation='nearest')
        for r in range(rows):
            for c in np.flatnonzero(pairs[r] == labels[r]):
                ax.add_patch(Rectangle(((c + 1) * (w + 1) - 0.5, r * (h + 1) - 0.5), w, h, fill=False,
                                       edgecolor='red', linewidth=1.2))
        ax.set_xticks([(c + 0.5) * (w + 1) - 1 for c in range(cols)])
        ax.set_xticklabels(['source', *titles], fontsize=7, rotation=90 if cols > 6 else 0)
        ax.xaxis.tick_top()
        ax.set_yticks([(r + 0.5) * (h + 1) - 1 for r in range(rows)])
        ax.set_yticklabels([f'class {int(y)}' for y in labels[:rows]], fontsize=7)
        ax.tick_params(length=0)
        for side in ax.spines.values():
            side.set_visible(False)
        cell = results[sampler][f'{scale:g}']
        acc = '' if cell.get('accuracy') is None else f"accuracy {cell['accuracy']:.2f}, "
        ax.set_xlabel(f"{sampler}, guidance {scale:g}: {acc}psnr {report.format_value(cell['psnr'])} dB, "
                      f"NFE {cell['nfe']}", fontsize=8)
    for ax in axes[len(keys):]:
        ax.axis('off')
    report.save_figure(fig, path, title)


# Reads the data, the flow's t_eps and eval (batch size, rk45 tolerances, lpips); `lpips` with eval.lpips.
METHOD = method.Method(name='edit', run=run, check=check, section=defaults, references=('edit.model',),
                       reads=('data', 'flow', 'eval'), lpips=uses_lpips)
