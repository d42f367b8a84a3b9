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
from absl import logging
from etils import epath
from scipy import spatial

from flowjax import errors, sharding
from flowjax.data import datasets, toy2d
from flowjax.flows import solvers
from flowjax.methods import method

Apply = Callable[[Any, jax.Array, jax.Array], jax.Array]
Velocity = Callable[[jax.Array, jax.Array], jax.Array]

_EMD_MAX_ITERS = 100_000_000  # Network-simplex pivots; only a cap (POT's default 1e5 can stop short).
_PLOT_TRAJECTORY_STEPS = 50

LEGEND = (
    'w2: exact 2-Wasserstein distance of samples to held-out data; '
    "energy: energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (no square root); "
    '(n): NFE; straightness: mean over t of E||(z1 - z0) - v(z_t, t)||^2 on an Euler path '
    '(RF), straightness_norm: same with the norm (SlimFlow); '
    'w2_data / energy_data: held-out data vs a second held-out sample (the noise floor); '
    'params: the number of model parameters. '
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
    import ot  # POT, imported when needed: it is slow to import and only toy data uses it

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


def parameter_count(params: Any) -> int:
    """The number of scalar parameters of a params pytree (the sum of its leaves' sizes)."""
    return sum(math.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params))


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
    the merged report `{model: {'params': n, sampler_key: {w2, energy, nfe}, straightness, ...}}`.
    """
    workdir = epath.Path(workdir)
    source = np.asarray(source, np.float32)
    data = np.asarray(data, np.float64)
    specs = [solvers.parse_sampler(s, rtol=rtol, atol=atol) for s in samplers]
    baseline = {'w2_data': w2(data, data_b), 'energy_data': energy_distance(data, data_b)}
    x0 = jnp.asarray(source)

    results, plots = {}, {}
    for name, (apply, params) in models.items():
        entry, samples = {'params': parameter_count(params)}, {}
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
    sharding.barrier('flowjax-evaluate-report')  # the other processes find the files written
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


def model_entry(entry: str) -> tuple[str, str]:
    """(label, path) of an `eval.models` entry: 'label=path', or a path labelled by its last component."""
    label, sep, path = ('', '', entry) if epath.Path(entry).exists() else entry.partition('=')
    return (label, path) if sep else (epath.Path(entry).name, entry)


def check(config: ml_collections.ConfigDict) -> None:
    """Static checks of the `evaluate` method's config."""
    check_data(config)
    if not config.eval.models:
        raise errors.ConfigError("eval.models: name at least one exported model ('label=path' or a stage)")
    labels = [model_entry(m)[0] for m in config.eval.models]
    known = ', '.join(labels)
    for group, members in (config.eval.get('groups') or {}).items():
        field = f'eval.groups.{group}'
        if (not isinstance(members, (tuple, list)) or not members
                or not all(isinstance(m, str) for m in members)):
            value = members.to_dict() if isinstance(members, ml_collections.ConfigDict) else members
            raise errors.ConfigError(f'{field}={value!r}: expected a non-empty tuple of model labels ({known})')
        for label in members:
            if label not in labels:
                raise errors.ConfigError(f'{field}: {label!r} is not a model of eval.models ({known})')
            if members.count(label) > 1:
                raise errors.ConfigError(f'{field}: {label!r} is listed twice')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Method 'evaluate': compares exported models (`eval.models`) on the same held-out sets.

    Each entry is an export path (or a pipeline stage name) or 'label=path'; the label
    defaults to the directory name. With `eval.couplings`, the coupling pass's pair count and
    mean NFE are reported too; with `eval.groups`, each group's mean / std / min / max
    (`group_statistics`).
    """
    from flowjax.methods import training  # it imports this module

    check(config)
    loaded = {}
    for entry in config.eval.models:
        label, path = model_entry(entry)
        model = training.load_model(path, 'eval.models')
        conditional = (model.kind.num_classes,) if model.kind.num_classes else ()
        loaded[label] = (model.kind.apply, model.params, *conditional)
    report = evaluate(config, epath.Path(workdir), loaded)
    groups = config.eval.get('groups') or {}
    stale = 'groups' in report and not groups  # from an earlier evaluation in this workdir
    report.pop('groups', None)
    if config.eval.couplings:
        from flowjax.data import couplings

        manifest = couplings.open_store(config.eval.couplings).manifest
        report['couplings'] = {'pairs': manifest['num_pairs'], 'mean_nfe': manifest['mean_nfe'],
                               'sampler': manifest['sampler'], 'direction': manifest['direction']}
    if groups:
        report['groups'] = group_statistics(report, groups)
    if config.eval.couplings or groups or stale:
        write_report(workdir, report)
    return report


def _statistics(values: Sequence[Any]) -> dict[str, Any]:
    """{mean, std (ddof=1; 0 for one value), min, max, n} of the finite values; 'failed': how many were not."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    n, failed = len(finite), len(values) - len(finite)
    if n:
        stats = {'mean': float(np.mean(finite)), 'std': float(np.std(finite, ddof=1)) if n > 1 else 0.0,
                 'min': min(finite), 'max': max(finite), 'n': n}
    else:
        stats = {'mean': None, 'std': None, 'min': None, 'max': None, 'n': 0}
    return {**stats, 'failed': failed} if failed else stats


def _is_score(values: Sequence[Any]) -> bool:
    """True if every value is a number or None (a failed score)."""
    return all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)


def _common(values: Sequence[Any]) -> Any:
    """The value all members share, else None."""
    return values[0] if values and all(v == values[0] for v in values) else None


def group_statistics(report: Mapping[str, Any], groups: Mapping[str, Sequence[str]]) -> dict[str, dict]:
    """Mean / std / min / max / n of each group's member scores in `report`.

    Per group: {'models': [...], 'params' (if all members agree), sampler_key: {metric: stats,
    'nfe' (if all agree)}, scalar: stats} for every numeric metric the members have ('nfe',
    'params' and the `*_data` floors are not averaged). std is the sample standard deviation
    (ddof=1, 0 for n = 1); None (failed) scores are left out and counted as 'failed'; a member
    without a metric is left out.
    """
    out = {}
    for group, labels in groups.items():
        missing = [label for label in labels if label not in report]
        if missing:
            raise errors.ConfigError(f'eval.groups.{group}: {missing[0]!r} is not a model of the report')
        members = [report[label] for label in labels]
        stats = {'models': list(labels)}
        params = _common([m.get('params') for m in members])
        stats.update({} if params is None else {'params': params})
        keys = list(dict.fromkeys(k for m in members for k, v in m.items() if isinstance(v, Mapping)))
        for key in keys:
            scores = [m[key] for m in members if isinstance(m.get(key), Mapping)]
            stats[key] = {}
            for metric in dict.fromkeys(name for s in scores for name in s):
                values = [s[metric] for s in scores if metric in s]
                if metric == 'nfe':
                    nfe = _common(values)
                    stats[key].update({} if nfe is None else {'nfe': nfe})
                elif _is_score(values):
                    stats[key][metric] = _statistics(values)
        scalars = dict.fromkeys(k for m in members for k, v in m.items()
                                if not isinstance(v, Mapping) and k != 'params' and not k.endswith('_data'))
        for name in scalars:
            values = [m[name] for m in members if name in m]
            if _is_score(values):
                stats[name] = _statistics(values)
        out[group] = stats
    return out


# ----------------------------------------------------------------------------
# Report files.
# ----------------------------------------------------------------------------


def read_report(workdir: str | epath.Path) -> dict:
    """The workdir's report.json, or {} if there is none yet."""
    path = epath.Path(workdir) / 'report.json'
    return json.loads(path.read_text()) if path.exists() else {}


# Report entries that describe the run rather than a model.
INFO_SECTIONS = ('couplings', 'groups')
ONE_STEP = 'euler@1'  # the first column of the tables, next to the parameter count


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


def format_count(n: int | None) -> str:
    """A parameter count in three digits: 27.9M, 190k, 1.23k, 512."""
    if n is None:
        return 'n/a'
    for scale, unit in ((1e9, 'B'), (1e6, 'M'), (1e3, 'k')):
        text = f'{n / scale:.3g}'
        if float(text) >= 1:
            return text + unit
    return str(n)


def _mean_std(stats: Mapping[str, Any] | None) -> str:
    """'mean ± std' of group statistics, with the count of failed members if any."""
    if stats is None:
        return '-'
    text = 'n/a' if stats['mean'] is None else f'{stats["mean"]:.4g} ± {stats["std"]:.2g}'
    return text + (f' ({stats["failed"]} failed)' if stats.get('failed') else '')


def _is_stats(value: Any) -> bool:
    return isinstance(value, Mapping) and 'mean' in value and 'n' in value


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return lines + ['| ' + ' | '.join(row) + ' |' for row in rows]


def _groups_markdown(groups: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The Groups table: a row per group, 'mean ± std' per sampler metric and per scalar."""
    columns, scalars = [], []
    for stats in groups.values():
        for k, v in stats.items():
            if _is_stats(v):
                scalars += [k] if k not in scalars else []
            elif isinstance(v, Mapping):
                columns += [(k, m) for m, s in v.items() if _is_stats(s) and (k, m) not in columns]
    columns.sort(key=lambda c: c[0] != ONE_STEP)
    with_params = any('params' in stats for stats in groups.values())
    header = ['group', 'n', *(['params'] if with_params else []), *(f'{k} {m}' for k, m in columns), *scalars]
    rows = [[name, str(len(stats['models'])), *([format_count(stats.get('params'))] if with_params else []),
             *(_mean_std(stats.get(k, {}).get(m)) for k, m in columns), *(_mean_std(stats.get(k)) for k in scalars)]
            for name, stats in groups.items()]
    note = 'Mean ± sample std over the models of each group (min, max and n in report.json).'
    return ['## Groups', '', note, ''] + _table(header, rows) + ['']


def report_markdown(report: Mapping[str, Any]) -> str:
    """One table per metric: rows are models, columns the parameter count and sampler keys, cells
    'value (NFE)'; then straightness and baselines, info sections and the Groups table."""
    info = {name: entry for name, entry in report.items() if name in INFO_SECTIONS}
    report = {name: entry for name, entry in report.items() if name not in INFO_SECTIONS}
    keys, metrics, scalars = [], [], []
    for entry in report.values():
        for k, v in entry.items():
            if isinstance(v, dict):
                keys += [k] if k not in keys else []
                metrics += [m for m in v if m != 'nfe' and m not in metrics]
            elif k not in scalars and k != 'params':
                scalars.append(k)
    keys.sort(key=lambda k: k != ONE_STEP)
    with_params = any('params' in entry for entry in report.values())
    params = ['params'] if with_params else []
    lines = ['# Evaluation report', '', LEGEND, '']
    for metric in metrics:
        rows = []
        for name, entry in report.items():
            cells = [f'{_fmt(entry[k].get(metric))} ({entry[k]["nfe"]})' if k in entry else '-'
                     for k in keys]
            rows.append([name] + ([format_count(entry.get('params'))] if with_params else []) + cells)
        lines += [f'## {metric}', ''] + _table(['model'] + params + keys, rows) + ['']
    rows = [[name] + [_fmt(entry.get(k)) for k in scalars] for name, entry in report.items()]
    lines += ['## straightness and baselines', ''] + _table(['model', *scalars], rows) + ['']
    for name, entry in info.items():
        if name != 'groups':
            lines += [f'## {name}', ''] + _table(list(entry), [[_fmt(v) for v in entry.values()]]) + ['']
    if info.get('groups'):
        lines += _groups_markdown(info['groups'])
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


# Evaluation reads the data, the flow's t_eps and its own `eval` section (eval.models and
# eval.couplings name earlier stages), not the model or training sections.
METHOD = method.Method(name='evaluate', run=run, check=check, references=('eval.models', 'eval.couplings'),
                       reads=('data', 'flow', 'eval'))
