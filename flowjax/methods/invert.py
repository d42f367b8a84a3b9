"""Method 'invert': held-out real data inverted to noise and regenerated (docs/methods.md, Inversion (method invert)).

For every model of `invert.models` and every sampler of `invert.samplers` that applies to its kind, the
first `invert.count` held-out examples of the data kind's suite (the points / images eval.reconstruction
uses, with their labels) are inverted to noise z by `kind.invert` and regenerated from z by `kind.sample`,
in the suite's chunks (sharded over all devices). Per (model, sampler) the report gives the round trip's
error: rmse (images in uint8 units), its spread over examples, mse, on images psnr and, with eval.lpips,
lpips; and the NFE of both directions. With several processes each inverts, regenerates and scores the
examples its devices hold; only the per-example scores (and the figure's first examples) are gathered.

The reserved model 'analytic' is the exact rectified flow from N(0, I) to a Gaussian N(mu, diag(s^2))
fitted per dimension to the same held-out examples (`analytic_model`): its inversion is known in closed
form, so its rows also report `noise_rmse`, the solver's inversion error alone.
"""

import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from flowjax import errors, evaluate, progress, sharding
from flowjax.data import datasets
from flowjax.evaluation import fidelity, images, job, report
from flowjax.flows import solvers
from flowjax.methods import method, training
from flowjax.models import kinds

ANALYTIC = 'analytic'  # the reserved entry of invert.models: the exact Gaussian flow of the held-out data
MIN_STD = 1e-2  # the analytic flow's per-dimension std s is floored here (constant pixels have s = 0)
SCORES = ('rmse', 'rmse_std', 'mse', 'psnr', 'lpips', 'noise_rmse')  # the report's tables, in this order
FILES = ('inversion.json', 'inversion.md', 'inversion.png')
DIFFERENCES = 'differences'  # the report's section of paired differences (invert.differences), not a model
LEGEND = (
    'Held-out real data (toy data: the first invert.count points of the held-out sample; images: invert.count '
    'dataset images, the fixed seeded subset eval.reconstruction uses, with their labels for class-conditional '
    'models) inverted to noise with the sampler and regenerated from that noise with the same sampler. '
    '(n): the NFE of both directions (nfe; invert_nfe is the inversion alone). '
    'rmse: mean over examples of each example\'s root mean squared error over dimensions, images in uint8 '
    'units (x 127.5 of [-1, 1]; unrounded); rmse_std: its standard deviation over examples; mse: mean over '
    'examples of the mean squared error over dimensions (data units); psnr: mean over images of '
    '10 log10(1 / MSE) in dB, images mapped to [0, 1] (higher is better); lpips: mean LPIPS (VGG16). '
    'analytic: the exact rectified flow from N(0, I) to N(mu, diag(s^2)), mu and s fitted per dimension to '
    'the same held-out examples; inverting then regenerating it exactly is the identity; noise_rmse: mean '
    'over examples of the RMSE of the inverted noise against the exact inversion (noise units), (n): '
    'invert_nfe. Lower is better everywhere except psnr.')


def defaults() -> ml_collections.ConfigDict:
    """The `invert` section."""
    c = ml_collections.ConfigDict()
    # exports to invert, as eval.models entries (stage names or 'label=path'), and 'analytic'
    c.models = ()
    c.samplers = ('euler@8', 'midpoint@4', 'euler@16', 'midpoint@8')
    c.count = 256  # held-out examples inverted
    c.guidance = 1.0  # classifier-free guidance scale of class-conditional models (1: none)
    c.grid = 8  # images: how many examples inversion.png shows (0: no figure)
    # 'key_a=key_b' pairs of invert.samplers: per model, the paired differences over examples of rmse a - b
    c.differences = ()
    return c


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_samplers(config: ml_collections.ConfigDict) -> list[solvers.Sampler]:
    """`invert.samplers` as Sampler objects (rk45 with eval.rtol / eval.atol); a bad one is a one-line error."""
    value = config.invert.samplers
    if not isinstance(value, (tuple, list)) or not value:
        raise errors.ConfigError(f"invert.samplers={value!r}: expected a non-empty tuple of sampler specs "
                                 "(e.g. ('euler@8', 'midpoint@4'))")
    return job.parse_samplers(config, value, 'invert.samplers')


def differences(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
    """`invert.differences` as (key_a, key_b) pairs of invert.samplers' keys; a bad one is a one-line error."""
    value = config.invert.get('differences', ())
    keys = [s.key for s in parse_samplers(config)]
    if not isinstance(value, (tuple, list)):
        raise errors.ConfigError(f"invert.differences={value!r}: expected a tuple of 'key_a=key_b' sampler pairs")
    out = []
    for pair in value:
        parts = pair.split('=') if isinstance(pair, str) else []
        if len(parts) != 2 or not all(k in keys for k in parts) or parts[0] == parts[1]:
            raise errors.ConfigError(f"invert.differences: {pair!r}: expected 'key_a=key_b', two different keys of "
                                     f"invert.samplers ({', '.join(keys)})")
        out.append((parts[0], parts[1]))
    return out


def model_entry(entry: str) -> tuple[str, str]:
    """(label, path) of an invert.models entry ('analytic' is (analytic, analytic))."""
    return (ANALYTIC, ANALYTIC) if entry == ANALYTIC else evaluate.model_entry(entry)


def check(config: ml_collections.ConfigDict) -> None:
    """Static checks of the invert method's config: its section, the data and eval.lpips."""
    datasets.check(config)
    inv = config.invert
    models = inv.models
    if (not isinstance(models, (tuple, list)) or not models
            or not all(isinstance(m, str) and m for m in models)):
        raise errors.ConfigError(f"invert.models={models!r}: expected a non-empty tuple of exports "
                                 f"('label=path' or a stage name) or {ANALYTIC!r}")
    labels = [model_entry(m)[0] for m in models]
    if DIFFERENCES in labels:
        raise errors.ConfigError(f"invert.models: the label {DIFFERENCES!r} is the report's section of paired "
                                 'differences; give the model another label')
    for label in labels:
        if labels.count(label) > 1:
            raise errors.ConfigError(f'invert.models: the label {label!r} is listed twice')
    parse_samplers(config)
    count = inv.count
    if not _is_int(count) or count < 1:
        raise errors.ConfigError(f'invert.count={count!r}: expected an int >= 1 (held-out examples to invert)')
    kinds.check_guidance(inv.guidance, 'invert.guidance')
    if not _is_int(inv.grid) or inv.grid < 0:
        raise errors.ConfigError(f'invert.grid={inv.grid!r}: expected an int >= 0 (images shown; 0: no figure)')
    differences(config)
    lpips = config.eval.get('lpips', False)
    if not isinstance(lpips, bool):
        raise errors.ConfigError(f'eval.lpips={lpips!r}: expected True or False')
    if lpips and config.data.kind != 'image':
        raise errors.ConfigError(f"eval.lpips=True: LPIPS scores images; data.kind={config.data.kind!r} is not 'image'")
    if config.data.kind == 'image':
        if count > (available := datasets.num_images(config)):
            raise errors.ConfigError(f'invert.count={count}: more than the {available} images of data.image')
        sharding.check_batch_size(config.eval.batch_size, sharding.data_mesh(), 'eval.batch_size')
        if lpips:
            from flowjax.metrics import lpips as lpips_lib

            lpips_lib.check_config(config.lpips, datasets.sample_shape(config))
    elif count > config.eval.num_samples:
        raise errors.ConfigError(f'invert.count={count}: more than the {config.eval.num_samples} points of the '
                                 'held-out sample (eval.num_samples)')


def uses_lpips(config: ml_collections.ConfigDict) -> bool:
    """Whether the inversion scores images with LPIPS (eval.lpips on image data): then `lpips` is read."""
    return config.get('eval', {}).get('lpips') is True and config.data.kind == 'image'


# --------------------------------------------------------------------------------------------- the analytic flow


def _broadcast(t: jax.Array, x: jax.Array) -> jax.Array:
    """Times (B,) (or a scalar) shaped to broadcast against x (B, ...)."""
    t = jnp.asarray(t, x.dtype)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim)) if t.ndim else t


def analytic_sigma(t: jax.Array, s: jax.Array) -> jax.Array:
    """sigma_t = sqrt((1 - t)^2 + t^2 s^2): the per-dimension std of x_t = (1 - t) x0 + t x1."""
    return jnp.sqrt(jnp.square(1 - t) + jnp.square(t * s))


def analytic_velocity(params: Mapping[str, jax.Array], x: jax.Array, t: jax.Array, dropout_rng=None,
                      label=None) -> jax.Array:
    """v(x, t) = mu + (sigma_t' / sigma_t)(x - t mu), sigma_t' / sigma_t = (t s^2 - (1 - t)) / sigma_t^2: the
    exact rectified-flow velocity from N(0, I) to N(mu, diag(s^2)) with independent coupling."""
    del dropout_rng, label
    mu, s = params['mu'], params['s']
    t = _broadcast(t, x)
    rate = (t * jnp.square(s) - (1 - t)) / jnp.square(analytic_sigma(t, s))
    return mu + rate * (x - t * mu)


def analytic_map(params: Mapping[str, Any], x: Any, a: float, b: float) -> Any:
    """The exact flow map of `analytic_velocity` from time a to b: x_b = b mu + (sigma_b / sigma_a)(x_a - a mu)."""
    mu, s = params['mu'], params['s']
    return b * mu + (analytic_sigma(b, s) / analytic_sigma(a, s)) * (x - a * mu)


def analytic_params(x1: np.ndarray) -> dict[str, np.ndarray]:
    """{'mu', 's'}: the per-dimension mean and std (ddof 0, floored at MIN_STD) of the examples x1 (N, ...)."""
    x = np.asarray(x1, np.float64)
    return {'mu': x.mean(axis=0).astype(np.float32), 's': np.maximum(x.std(axis=0), MIN_STD).astype(np.float32)}


ANALYTIC_KIND = kinds.VelocityFunction(analytic_velocity)


def analytic_model(x1: np.ndarray) -> kinds.Model:
    """The analytic flow of the examples x1, a velocity function of params {'mu', 's'}."""
    return kinds.Model(ANALYTIC_KIND, analytic_params(x1))


def exact_noise(params: Mapping[str, np.ndarray], x1: np.ndarray, start: float) -> np.ndarray:
    """The exact inversion of x1 by the analytic flow, to time `start` (= (x1 - mu) / s at start 0)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    return np.asarray(analytic_map(p, np.asarray(x1, np.float64), 1.0, start), np.float32)


# --------------------------------------------------------------------------------------------- the job


def _suite(config: ml_collections.ConfigDict, workdir: epath.Path) -> job.Suite:
    """The data kind's suite, only for its held-out data, chunks and compare: images without a metric
    network (eval.metric 'none') and with LPIPS as eval.lpips says."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.eval.samplers = tuple(config.invert.samplers)
    c.eval.reconstruction = config.invert.count  # what the suite's LPIPS network is loaded for
    c.eval.preservation = 0
    if config.data.kind == 'image':
        c.eval.metric = 'none'
    return job.SUITES[config.data.kind].prepare(c, workdir)


def _load(entry: str, x1: np.ndarray) -> tuple[str, kinds.Model]:
    label, path = model_entry(entry)
    if path == ANALYTIC:
        return label, analytic_model(x1)
    return label, training.load_model(path, 'invert.models')


def _mean(values: list[np.ndarray]) -> float | None:
    return report.finite_or_none(float(np.mean(np.concatenate(values))))


def invert_model(name: str, model: kinds.Model, suite: job.Suite, samplers: Sequence[solvers.Sampler], *,
                 x1: np.ndarray, labels: np.ndarray | None, eps: float, guidance: float, image: bool,
                 source: str, shown: int = 0, pairs: Sequence[tuple[str, str]] = ()
                 ) -> tuple[dict[str, dict], dict[str, np.ndarray], dict[str, dict]]:
    """({sampler key: cell}, {sampler key: the first `shown` reconstructions}, {'a - b': paired statistics of
    the per-example rmse, for each pair of `pairs` whose samplers both apply}) of one model."""
    kind = model.kind  # guidance applies to class-conditional models only
    kind = kinds.guided(kind, guidance, 'invert.guidance', f'model {name!r}') if kind.num_classes else kind
    applicable = [s for s in samplers if kind.supports(s)]
    if not applicable:
        raise errors.UserError(f"invert {name}: none of invert.samplers ({', '.join(s.key for s in samplers)}) "
                               f'applies to a model of kind {kind.name!r}')
    label = job.class_labels(kind.num_classes, labels, f'invert {name}', source)
    analytic = kind is ANALYTIC_KIND
    rows = [x1] + ([] if label is None else [label])
    if analytic:
        rows.append(exact_noise(model.params, x1, kind.start(eps)))
    scale = fidelity.UINT8_SCALE if image else 1.0
    entry, figures, per_example = {}, {}, {}
    for sampler in applicable:
        invert_fn, sample_fn = (job.kind_function(kind, op, sampler, eps) for op in ('invert', 'sample'))
        scores: dict[str, list[np.ndarray]] = {}
        nfe_in, nfe = [], []
        outs = []
        done = progress.Progress(f'invert {name} {sampler.key}', len(x1), unit='examples')
        for (x, *rest), valid in suite.chunks(rows):
            y = rest[0] if label is not None else None
            z, n_in = invert_fn(model.params, x, y)
            out, n_out = sample_fn(model.params, z, y)
            per = {**suite.compare(out, x, valid), **sharding.map_rows(
                lambda got, want: {'mse': fidelity.mse(got, want), 'rmse': fidelity.rmse(got, want, scale)},
                out, x, count=valid)}
            if analytic:
                per['noise_rmse'] = sharding.map_rows(fidelity.rmse, z, rest[-1], count=valid)
            for score, values in per.items():
                scores.setdefault(score, []).append(values)
            nfe_in.append(int(n_in))
            nfe.append(int(n_in) + int(n_out))
            if (have := sum(map(len, outs))) < shown:
                outs.append(sharding.head(out, min(valid, shown - have)))
            done.update(valid)
        cell = {'nfe': job.mean_nfe(nfe), 'invert_nfe': job.mean_nfe(nfe_in)}
        rmse = per_example[sampler.key] = np.concatenate(scores['rmse'])
        cell['rmse_std'] = report.finite_or_none(float(np.std(rmse))) if np.isfinite(rmse).all() else None
        cell.update({score: _mean(values) for score, values in scores.items()})
        entry[sampler.key] = {k: cell[k] for k in ('nfe', 'invert_nfe', *SCORES) if k in cell}
        if shown:
            figures[sampler.key] = np.concatenate(outs)[:shown]
        logging.info('invert %s %s: %s', name, sampler.key, entry[sampler.key])
    paired = {f'{a} - {b}': report._paired([report.finite_or_none(float(d)) for d in per_example[a] - per_example[b]])
              for a, b in pairs if a in per_example and b in per_example}
    return entry, figures, paired


def read_inversion(workdir: str | epath.Path) -> dict:
    """The workdir's inversion.json, or {} if there is none yet."""
    path = epath.Path(workdir) / FILES[0]
    return json.loads(path.read_text()) if path.exists() else {}


def _cell(value: Any, nfe: Any) -> str:
    return f'{report.format_value(value)} ({nfe})'


def inversion_markdown(results: Mapping[str, Mapping[str, dict]]) -> str:
    """One table per score: rows models, columns sampler keys, cells 'value (NFE)'; then the paired differences."""
    paired = results.get(DIFFERENCES) or {}
    results = {name: entry for name, entry in results.items() if name != DIFFERENCES}
    keys = list(dict.fromkeys(k for entry in results.values() for k in entry))
    lines = ['# Inversion report', '', LEGEND, '']
    for score in SCORES:
        rows = []
        for name, entry in results.items():
            if not any(score in cell for cell in entry.values()):
                continue
            nfe = 'invert_nfe' if score == 'noise_rmse' else 'nfe'
            rows.append([name] + [_cell(entry[k].get(score), entry[k][nfe]) if k in entry else '-' for k in keys])
        if rows:
            heading = f'## {score} (higher is better)' if report.higher_is_better(score) else f'## {score}'
            lines += [heading, ''] + report._table(['model', *keys], rows) + ['']
    columns = list(dict.fromkeys(c for stats in paired.values() for c in stats))
    if columns:
        def cell(stats):
            if stats is None:
                return '-'
            text = 'n/a' if stats['mean'] is None else f"{stats['mean']:.4g} ± {stats['std']:.2g}"
            return text + (f" (t {stats['t']:.2g})" if 't' in stats else '')

        note = ('Per model, over the inverted examples: mean ± sample std of rmse(a) - rmse(b) and the paired t '
                'statistic mean / (std / sqrt(n)); negative: sampler a reconstructs better.')
        rows = [[name, *(cell(stats.get(c)) for c in columns)] for name, stats in paired.items()]
        lines += ['## Paired differences (rmse)', '', note, ''] + report._table(['model', *columns], rows) + ['']
    return '\n'.join(lines)


def save_figure(path: epath.Path, sources: np.ndarray, shown: Mapping[str, Mapping[str, np.ndarray]],
                results: Mapping[str, Mapping[str, dict]], title: str = '') -> None:
    """inversion.png: the sources in the top row, then a row per model and sampler of their reconstructions,
    titled with the cell's rmse and NFE."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def label(name, key):
        cell = results[name][key]
        return f"{name}: {key}, rmse {report.format_value(cell['rmse'])} (NFE {cell['nfe']})"

    rows = [('held-out data', sources)] + [(label(name, key), x) for name, panels in shown.items()
                                             for key, x in panels.items()]
    n = len(sources)
    fig = Figure(figsize=(max(3.0, 0.9 * n), 1.2 * len(rows)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    for ax, (label, x) in zip(axes, rows):
        tile = images.grid(x, columns=n)
        ax.imshow(tile[..., 0] if tile.shape[-1] == 1 else tile, cmap='gray', vmin=0, vmax=255,
                  interpolation='nearest')
        ax.set_title(label, fontsize=8)
        ax.axis('off')
    report.save_figure(fig, path, title)


def write_report(workdir: epath.Path, results: Mapping[str, dict]) -> dict:
    """Merges `results` into the workdir's inversion.json (model by model, and its differences model by
    model) and writes it and inversion.md atomically on process 0; returns the merged report."""
    earlier = read_inversion(workdir)
    merged = {**earlier, **results}
    paired = {**(earlier.get(DIFFERENCES) or {}), **(results.get(DIFFERENCES) or {})}
    if paired:
        merged[DIFFERENCES] = paired
    if jax.process_index() == 0:
        report._write_atomic(workdir / FILES[0], json.dumps(merged, indent=2) + '\n')
        report._write_atomic(workdir / FILES[1], inversion_markdown(merged))
    return merged


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Method 'invert': every model of invert.models inverted and regenerated with invert.samplers."""
    check(config)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    inv, image = config.invert, config.data.kind == 'image'
    samplers = parse_samplers(config)
    suite = _suite(config, workdir)
    x1, labels = suite.held_out(inv.count)
    x1 = np.asarray(x1, np.float32)
    source = 'data.image' if image else 'the held-out data'
    shown = min(inv.grid, inv.count) if image else 0
    pairs = differences(config)
    results, figures, paired = {}, {}, {}
    for entry in inv.models:
        name, model = _load(entry, x1)
        results[name], panels, paired[name] = invert_model(
            name, model, suite, samplers, x1=x1, labels=labels, eps=config.flow.t_eps, guidance=inv.guidance,
            image=image, source=source, shown=shown, pairs=pairs)
        if shown:
            figures[name] = panels
    if pairs:
        results[DIFFERENCES] = paired
    merged = write_report(workdir, results)
    if shown and jax.process_index() == 0:
        title = f'inversion on {datasets.describe(config)}'
        title += '' if inv.guidance == 1 else f', guidance {inv.guidance:g}'
        save_figure(workdir / FILES[2], x1[:shown], figures, results, title)
    sharding.barrier('flowjax-invert-report')
    return merged


# The inversion reads the data (held-out examples), the flow's t_eps and eval (eval.batch_size chunks images,
# eval.num_samples is the toy held-out sample, eval.rtol / atol set rk45, eval.lpips), and `lpips` with eval.lpips.
METHOD = method.Method(name='invert', run=run, check=check, section=defaults, references=('invert.models',),
                       reads=('data', 'flow', 'eval'), lpips=uses_lpips, reserved=(ANALYTIC,))
