"""Evaluation of trained flows and the reports written to the workdir.

Toy 2D: sample with each ODE sampler from a fixed source batch, compare to
held-out data (exact W2, energy distance), measure straightness, and write
`report.json`, `report.md` and `samples.png`. Images: FID / fd_digits and sample
grids, in image_eval.py. `evaluate` picks by `data.kind`.
"""

import functools
import io
import json
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import ot
from absl import logging
from etils import epath
from scipy import spatial

from flowjax import errors
from flowjax.data import datasets, toy2d
from flowjax.flows import solvers

Apply = Callable[[Any, jax.Array, jax.Array], jax.Array]
Velocity = Callable[[jax.Array, jax.Array], jax.Array]

_EMD_MAX_ITERS = 100_000_000  # Network-simplex pivots; only a cap (POT's default 1e5 can stop short).
_PLOT_TRAJECTORY_STEPS = 50

LEGEND = (
    'w2: exact 2-Wasserstein distance of samples to held-out data; '
    "energy: energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (no square root); "
    '(n): NFE; straightness: mean over t of E||(z1 - z0) - v(z_t, t)||^2 on an Euler path '
    '(RF), straightness_norm: same with the norm (SlimFlow); '
    'w2_data / energy_data: held-out data vs a second held-out sample (the noise floor). '
    'Images: fid (Inception-v3 features, pytorch-fid weights) or fd_digits (features of the '
    'shipped digits classifier): Frechet distance of the samples to the statistics of the whole '
    'dataset; fid_data / fd_digits_data: the same for as many real images (the floor). '
    'Lower is better everywhere.')

# ----------------------------------------------------------------------------
# Toy 2D point-cloud metrics.
# ----------------------------------------------------------------------------


def w2(x: np.ndarray, y: np.ndarray) -> float:
    """Exact 2-Wasserstein distance between equal-weight point clouds (network simplex)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    a = np.full(len(x), 1.0 / len(x))
    b = np.full(len(y), 1.0 / len(y))
    cost = spatial.distance.cdist(x, y, 'sqeuclidean')  # Exact zeros on ties.
    value, log = ot.emd2(a, b, cost, numItermax=_EMD_MAX_ITERS, log=True)
    if log.get('warning') is not None:
        raise RuntimeError(f'w2: exact OT did not converge: {log["warning"]}')
    return math.sqrt(max(float(value), 0.0))


def _mean_distance(x: np.ndarray, y: np.ndarray) -> float:
    """E|X - Y| over all pairs (V-statistic)."""
    return float(spatial.distance.cdist(x, y, 'euclidean').mean())


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistics, no square root)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    value = 2.0 * _mean_distance(x, y) - _mean_distance(x, x) - _mean_distance(y, y)
    return max(float(value), 0.0)


def path_straightness(xs: np.ndarray, vs: np.ndarray, duration: float) -> dict[str, float]:
    """Straightness of Euler paths xs (S+1, B, ...) with step velocities vs (S, B, ...).

    The chord (z1 - z0) is divided by the path's duration so that it is the mean
    velocity; on [0, 1] this is exactly z1 - z0.
    """
    xs = np.asarray(xs, np.float64)
    vs = np.asarray(vs, np.float64)
    chord = (xs[-1] - xs[0]) / duration
    diff = (chord[None] - vs).reshape(vs.shape[0], vs.shape[1], -1)
    sq = np.sum(diff * diff, axis=-1)
    return {'straightness': float(sq.mean()), 'straightness_norm': float(np.sqrt(sq).mean())}


def straightness(velocity: Velocity, x0: np.ndarray, *, steps: int = 100,
                 eps: float = 1e-3) -> dict[str, float]:
    """Mean over an Euler grid on [eps, 1] of ||(z1 - z0) - v_t||^2 and of its norm."""
    path = jax.jit(functools.partial(solvers.trajectory, velocity, steps=steps, t0=eps, t1=1.0))
    xs, vs = path(jnp.asarray(x0, jnp.float32))
    return path_straightness(xs, vs, 1.0 - eps)


@functools.cache
def model_path(apply: Apply, steps: int, eps: float) -> Callable:
    """Jitted `fn(params, x) -> (xs, vs)`: the Euler path from eps to 1, params traced."""

    @jax.jit
    def fn(params, x):
        return solvers.trajectory(functools.partial(apply, params), x, steps=steps, t0=eps, t1=1.0)

    return fn


# ----------------------------------------------------------------------------
# Toy 2D evaluation of a set of models.
# ----------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    """JSON-safe metric: None (null) where a sampler diverged."""
    return value if math.isfinite(value) else None


def _sample_metrics(x1: np.ndarray, data: np.ndarray, nfe: int) -> dict[str, Any]:
    """{'w2', 'energy', 'nfe'} of one sampler's output against held-out data."""
    if not np.all(np.isfinite(x1)):  # e.g. rk45 hit max_steps and returned NaNs.
        return {'w2': None, 'energy': None, 'nfe': nfe}
    return {'w2': _finite(w2(x1, data)), 'energy': _finite(energy_distance(x1, data)), 'nfe': nfe}


def evaluate_models(models: Mapping[str, tuple[Apply, Any]], *, source: np.ndarray,
                    data: np.ndarray, data_b: np.ndarray, samplers: Sequence[str],
                    workdir: str | epath.Path, eps: float = 1e-3,
                    straightness_steps: int = 100, trajectory_count: int = 16,
                    title: str = '', rtol: float = 1e-5, atol: float = 1e-5) -> dict:
    """Samples every model with every sampler, scores it, merges into the workdir report.

    Writes `report.json`, `report.md` and `samples.png` (process 0 only) and returns
    the merged report `{model: {sampler_key: {w2, energy, nfe}, straightness, ...}}`.
    """
    workdir = epath.Path(workdir)
    source = np.asarray(source, np.float32)
    data = np.asarray(data, np.float64)
    specs = [solvers.parse_sampler(s, rtol=rtol, atol=atol) for s in samplers]
    baseline = {'w2_data': w2(data, data_b), 'energy_data': energy_distance(data, data_b)}
    x0 = jnp.asarray(source)

    results, plots = {}, {}
    for name, (apply, params) in models.items():
        entry, samples = {}, {}
        for spec in specs:
            x1, nfe = solvers.make_sampler(apply, spec, eps=eps)(params, x0)
            x1 = np.asarray(jax.device_get(x1))
            entry[spec.key] = _sample_metrics(x1, data, int(nfe))
            samples[spec.key] = x1
            logging.info('evaluate %s %s: %s', name, spec.key, entry[spec.key])
        xs, vs = model_path(apply, straightness_steps, eps)(params, x0)
        entry.update({k: _finite(v) for k, v in path_straightness(xs, vs, 1.0 - eps).items()})
        entry.update(baseline)
        results[name] = entry
        paths, _ = model_path(apply, _PLOT_TRAJECTORY_STEPS, eps)(params, x0[:trajectory_count])
        plots[name] = (samples, np.asarray(paths))

    report = {**read_report(workdir), **results}
    if jax.process_index() == 0:
        write_report(workdir, report)
        if plots:
            _plot_samples(workdir / 'samples.png', results, plots, source=source, data=data,
                          title=title)
    return report


def parse_samplers(config: ml_collections.ConfigDict) -> list[solvers.Sampler]:
    """`config.eval.samplers` as Sampler objects; a bad spec is a one-line config error."""
    try:
        return [solvers.parse_sampler(s, rtol=config.eval.rtol, atol=config.eval.atol)
                for s in config.eval.samplers]
    except ValueError as e:
        raise errors.ConfigError(f'eval.samplers: {e}') from None


def evaluate_toy(config: ml_collections.ConfigDict, workdir: str | epath.Path,
                 models: Mapping[str, tuple[Apply, Any]]) -> dict:
    """Scores toy-2D models on held-out sets drawn from `config.data` (fixed by the seed)."""
    parse_samplers(config)
    n = config.eval.num_samples
    key = jax.random.fold_in(jax.random.key(config.seed), 0xE7A1)
    source = toy2d.sample(config.data.source, jax.random.fold_in(key, 0), n, 'data.source')
    data = toy2d.sample(config.data.target, jax.random.fold_in(key, 1), n)
    data_b = toy2d.sample(config.data.target, jax.random.fold_in(key, 2), n)
    return evaluate_models(
        models, source=source, data=data, data_b=data_b, samplers=config.eval.samplers, workdir=workdir,
        eps=config.flow.t_eps, straightness_steps=config.eval.straightness_steps,
        trajectory_count=config.eval.trajectories, title=f'{config.method} on {config.data.target.name}',
        rtol=config.eval.rtol, atol=config.eval.atol)


def evaluate(config: ml_collections.ConfigDict, workdir: str | epath.Path,
             models: Mapping[str, tuple[Apply, Any]]) -> dict:
    """Scores models on `config.data`: toy 2D point clouds, or images (FID / fd_digits)."""
    if config.data.kind == 'image':
        from flowjax import image_eval

        return image_eval.evaluate_images(config, workdir, models)
    return evaluate_toy(config, workdir, models)


def check_data(config: ml_collections.ConfigDict) -> None:
    """Static checks of the data and evaluation fields a training method evaluates with."""
    datasets.check(config)
    parse_samplers(config)
    if config.data.kind == 'image':
        from flowjax import image_eval

        image_eval.check(config)


def check(config: ml_collections.ConfigDict) -> None:
    """Static checks of the `evaluate` method's config."""
    check_data(config)
    if not config.eval.models:
        raise errors.ConfigError("eval.models: name at least one exported model ('label=path' or a stage)")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Method 'evaluate': compares exported models (`eval.models`) on the same held-out sets.

    Each entry is an export path (or a pipeline stage name) or 'label=path'; the label
    defaults to the directory name. With `eval.couplings`, the coupling pass's pair count and
    mean NFE are reported too.
    """
    from flowjax import methods, models  # methods imports this module

    check(config)
    loaded = {}
    for entry in config.eval.models:
        label, sep, path = ('', '', entry) if epath.Path(entry).exists() else entry.partition('=')
        path = path if sep else entry
        module, params, meta = methods.load_model(path, 'eval.models')
        classes = models.num_classes(ml_collections.ConfigDict(meta['model']))
        conditional = (classes,) if classes else ()
        loaded[label if sep else epath.Path(path).name] = (models.apply_fn(module), params, *conditional)
    report = evaluate(config, epath.Path(workdir), loaded)
    if config.eval.couplings:
        from flowjax.data import couplings

        manifest = couplings.open_store(config.eval.couplings).manifest
        report['couplings'] = {'pairs': manifest['num_pairs'], 'mean_nfe': manifest['mean_nfe'],
                               'sampler': manifest['sampler'], 'direction': manifest['direction']}
        write_report(workdir, report)
    return report


# ----------------------------------------------------------------------------
# Report files.
# ----------------------------------------------------------------------------


def read_report(workdir: str | epath.Path) -> dict:
    """The workdir's report.json, or {} if there is none yet."""
    path = epath.Path(workdir) / 'report.json'
    return json.loads(path.read_text()) if path.exists() else {}


# Report entries that describe the run rather than a model.
INFO_SECTIONS = ('couplings',)


def _write_atomic(path: epath.Path, text: str) -> None:
    tmp = path.parent / f'.{path.name}.{uuid.uuid4().hex}.tmp'
    tmp.write_text(text)
    tmp.replace(path)


def write_report(workdir: str | epath.Path, report: Mapping[str, Any]) -> None:
    """Writes report.json and report.md atomically (process 0 only)."""
    if jax.process_index() != 0:
        return
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _write_atomic(workdir / 'report.json', json.dumps(report, indent=2) + '\n')
    _write_atomic(workdir / 'report.md', report_markdown(report))


def _fmt(value: Any) -> str:
    if value is None:
        return 'n/a'
    return f'{value:.4g}' if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return lines + ['| ' + ' | '.join(row) + ' |' for row in rows]


def report_markdown(report: Mapping[str, Any]) -> str:
    """One table per metric: rows are models, columns sampler keys, cells 'value (NFE)'."""
    info = {name: entry for name, entry in report.items() if name in INFO_SECTIONS}
    report = {name: entry for name, entry in report.items() if name not in INFO_SECTIONS}
    keys, metrics, scalars = [], [], []
    for entry in report.values():
        for k, v in entry.items():
            if isinstance(v, dict):
                keys += [k] if k not in keys else []
                metrics += [m for m in v if m != 'nfe' and m not in metrics]
            elif k not in scalars:
                scalars.append(k)
    lines = ['# Evaluation report', '', LEGEND, '']
    for metric in metrics:
        rows = []
        for name, entry in report.items():
            cells = [f'{_fmt(entry[k].get(metric))} ({entry[k]["nfe"]})' if k in entry else '-'
                     for k in keys]
            rows.append([name] + cells)
        lines += [f'## {metric}', ''] + _table(['model'] + keys, rows) + ['']
    rows = [[name] + [_fmt(entry.get(k)) for k in scalars] for name, entry in report.items()]
    lines += ['## straightness and baselines', ''] + _table(['model', *scalars], rows) + ['']
    for name, entry in info.items():
        lines += [f'## {name}', ''] + _table(list(entry), [[_fmt(v) for v in entry.values()]]) + ['']
    return '\n'.join(lines)


# ----------------------------------------------------------------------------
# Figure.
# ----------------------------------------------------------------------------


def _panel_keys(samples: Mapping[str, np.ndarray]) -> list[str]:
    """The first and last sampler evaluated (e.g. euler@1 and rk45), without repeats."""
    keys = list(samples)
    return list(dict.fromkeys(keys[:1] + keys[-1:]))


def _plot_samples(path: epath.Path, results: Mapping[str, dict], plots: Mapping[str, tuple],
                  *, source: np.ndarray, data: np.ndarray, title: str) -> None:
    """Per model: sample panels for the cheapest and last sampler, then a trajectory panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    both = np.concatenate([source, data])
    lo, hi = np.percentile(both, 0.5, axis=0), np.percentile(both, 99.5, axis=0)
    center, half = (lo + hi) / 2, 0.6 * np.max(hi - lo)
    cols = 1 + max(len(_panel_keys(samples)) for samples, _ in plots.values())
    fig = Figure(figsize=(4 * cols, 4 * len(plots)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(plots), cols, squeeze=False)
    for row, (name, (samples, paths)) in zip(axes, plots.items()):
        keys = _panel_keys(samples)
        for ax, key in zip(row, keys):
            m = results[name][key]
            ax.scatter(data[:, 0], data[:, 1], s=2, c='0.8', lw=0)
            ax.scatter(samples[key][:, 0], samples[key][:, 1], s=2, c='C0', lw=0)
            ax.set_title(f'{name}: {key} (NFE {m["nfe"]})\nw2 {_fmt(m["w2"])}', fontsize=10)
        ax = row[len(keys)]
        ax.scatter(data[:, 0], data[:, 1], s=2, c='0.8', lw=0)
        ax.plot(paths[:, :, 0], paths[:, :, 1], c='C1', lw=0.8, alpha=0.8)
        ax.scatter(paths[0, :, 0], paths[0, :, 1], s=8, c='k', zorder=3)
        ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=8, c='C3', zorder=3)
        ax.set_title(f'{name}: {paths.shape[1]} Euler trajectories ({len(paths) - 1} steps)\n'
                     'black: x0, red: endpoint', fontsize=10)
        for ax in row:
            ax.set_xlim(center[0] - half, center[0] + half)
            ax.set_ylim(center[1] - half, center[1] + half)
            ax.set_aspect('equal')
            ax.tick_params(labelsize=7)
        for ax in row[len(keys) + 1:]:
            ax.axis('off')
    save_figure(fig, path, title)


def save_figure(fig, path: epath.Path, title: str = '') -> None:
    """Writes a matplotlib figure as PNG (local or bucket path), with an optional title."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png')
    path.write_bytes(buf.getvalue())
