"""The workdir's evaluation report: report.json, report.md and the statistics of model groups.

Every data kind writes the same report: `{model: {'params': n, sampler_key: {metric: value, 'nfe': n},
'straightness': ..., '<metric>_data': floor}}`, plus the info sections `couplings` and `groups`.
A sampler's cell may also hold reconstruction / preservation scores, `<task>_<score>` with the
task's own NFE `<task>_nfe` (evaluation/fidelity.py).
Also the PNG writer every figure of the report goes through.
"""

import io
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from etils import epath

from flowjax import errors

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
# What the legend adds when a report holds reconstruction or preservation scores (docs/methods.md, Metrics).
FIDELITY_LEGEND = (
    'reconstruction_*: held-out real data (toy data: the first eval.reconstruction points of the held-out '
    'sample; images: eval.reconstruction dataset images, a fixed seeded subset) inverted to noise and '
    'regenerated with the same sampler through the model kind, compared with the input, (n): the round '
    "trip's NFE (reconstruction_nfe); preservation_*: the first eval.preservation pairs (x0, x1) of the "
    'coupling store eval.couplings sampled from x0 and compared with the stored x1, (n): preservation_nfe; '
    'mse: mean over examples of the mean squared error over dimensions; psnr: mean over images of '
    '10 log10(1 / MSE) in dB, images mapped from [-1, 1] to [0, 1]; lpips: mean LPIPS (VGG16, the lpips section).')
FIDELITY_TASKS = ('reconstruction', 'preservation')
HIGHER_IS_BETTER = ('psnr',)  # scores (the last part of a metric's name) where higher is better
# Report entries that describe the run rather than a model.
INFO_SECTIONS = ('couplings', 'groups', 'differences')
ONE_STEP = 'euler@1'  # the first column of the tables, next to the parameter count


def is_nfe(metric: str) -> bool:
    """Whether a cell entry is an NFE ('nfe', or a task's '<task>_nfe'): reported, not a score."""
    return metric == 'nfe' or metric.endswith('_nfe')


def nfe_key(metric: str, cell: Mapping[str, Any]) -> str:
    """The cell's NFE entry that goes with `metric`: '<task>_nfe' for a task's score, else 'nfe'."""
    task = metric.partition('_')[0]
    return f'{task}_nfe' if task in FIDELITY_TASKS and f'{task}_nfe' in cell else 'nfe'


def higher_is_better(metric: str) -> bool:
    return metric.rpartition('_')[2] in HIGHER_IS_BETTER


def _legend(metrics: Sequence[str]) -> str:
    """LEGEND, with the fidelity scores and their directions when the report has any."""
    if not any(m.partition('_')[0] in FIDELITY_TASKS for m in metrics):
        return LEGEND
    higher = sorted({m.rpartition('_')[2] for m in metrics if higher_is_better(m)})
    direction = (f"Lower is better everywhere except {', '.join(higher)} (higher is better)." if higher
                 else 'Lower is better everywhere.')
    return f"{LEGEND.removesuffix('Lower is better everywhere.')}{FIDELITY_LEGEND} {direction}"


def finite_or_none(value: float) -> float | None:
    """A JSON-safe metric: None (null) where a sampler diverged."""
    return value if math.isfinite(value) else None


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
    'nfe' and '<task>_nfe' (if all agree)}, scalar: stats} for every numeric metric the members
    have (NFEs, 'params' and the `*_data` floors are not averaged). std is the sample standard deviation
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
                if is_nfe(metric):
                    nfe = _common(values)
                    stats[key].update({} if nfe is None else {metric: nfe})
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


def read_report(workdir: str | epath.Path) -> dict:
    """The workdir's report.json, or {} if there is none yet."""
    path = epath.Path(workdir) / 'report.json'
    return json.loads(path.read_text()) if path.exists() else {}


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


def format_value(value: Any) -> str:
    """A report cell: 4 significant digits for floats, 'n/a' for a failed score."""
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


def _difference(a: Any, b: Any) -> float | None:
    finite = all(v is not None and not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
                 for v in (a, b))
    return float(a) - float(b) if finite else None


def _paired(values: Sequence[float | None]) -> dict[str, Any]:
    """`_statistics` of paired differences, with the paired t statistic mean / (std / sqrt(n)) when defined."""
    stats = _statistics(values)
    if stats['n'] > 1 and stats['std'] > 0:
        stats['t'] = stats['mean'] / (stats['std'] / math.sqrt(stats['n']))
    return stats


def paired_differences(report: Mapping[str, Any], groups: Mapping[str, Sequence[str]],
                       differences: Mapping[str, Sequence[str]]) -> dict[str, dict]:
    """For each `name: (group_a, group_b[, 'key_a=key_b', ...])`: the differences a_i - b_i of every
    score the i-th models of the two groups share (e.g. the same seed in two arms; `group_b` may also
    name one model, then b_i is that model for every i), summarised as
    mean / std / min / max / n and the paired t statistic. Column pairs 'key_a=key_b' compare a's
    sampler cell key_a with b's key_b instead of equal keys (CAF's caf@1 with 2-RF's euler@1: the same
    step count), stored under 'key_a - key_b'. Per difference: {'pairs': [[a_i, b_i], ...],
    sampler_key: {metric: stats}, scalar: stats}; a pair where either score failed is left out and
    counted as 'failed'.
    """
    out = {}
    for name, (group_a, group_b, *columns) in differences.items():
        b = groups[group_b] if group_b in groups else (group_b,) * len(groups[group_a])
        pairs = list(zip(groups[group_a], b))
        entries = [(report[a], report[b]) for a, b in pairs]
        stats: dict[str, Any] = {'pairs': [list(p) for p in pairs]}
        first_a, first_b = entries[0]
        cells = ([tuple(c.split('=', 1)) for c in columns]
                 or [(k, k) for k, v in first_a.items() if isinstance(v, Mapping)])
        for key_a, key_b in cells:
            if isinstance(first_a.get(key_a), Mapping) and isinstance(first_b.get(key_b), Mapping):
                metrics = [m for m in first_a[key_a] if not is_nfe(m) and all(
                    m in ea.get(key_a, {}) and m in eb.get(key_b, {}) for ea, eb in entries)]
                stats[key_a if key_a == key_b else f'{key_a} - {key_b}'] = {
                    m: _paired([_difference(ea[key_a][m], eb[key_b][m]) for ea, eb in entries]) for m in metrics}
        for key, cell in first_a.items():
            if (not isinstance(cell, Mapping) and key != 'params' and not key.endswith('_data')
                    and all(key in ea and key in eb for ea, eb in entries) and _is_score([cell])):
                stats[key] = _paired([_difference(ea[key], eb[key]) for ea, eb in entries])
        out[name] = stats
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return lines + ['| ' + ' | '.join(row) + ' |' for row in rows]


def _stats_columns(rows: Mapping[str, Mapping[str, Any]]) -> tuple[list[tuple[str, str]], list[str]]:
    """The (sampler key, metric) columns and the scalar columns holding statistics in any row,
    in first-seen order with the one-step sampler first."""
    columns, scalars = [], []
    for stats in rows.values():
        for k, v in stats.items():
            if _is_stats(v):
                scalars += [k] if k not in scalars else []
            elif isinstance(v, Mapping):
                columns += [(k, m) for m, s in v.items() if _is_stats(s) and (k, m) not in columns]
    columns.sort(key=lambda c: c[0] != ONE_STEP)
    return columns, scalars


def _groups_markdown(groups: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The Groups table: a row per group, 'mean ± std' per sampler metric and per scalar."""
    columns, scalars = _stats_columns(groups)
    with_params = any('params' in stats for stats in groups.values())
    header = ['group', 'n', *(['params'] if with_params else []), *(f'{k} {m}' for k, m in columns), *scalars]
    rows = [[name, str(len(stats['models'])), *([format_count(stats.get('params'))] if with_params else []),
             *(_mean_std(stats.get(k, {}).get(m)) for k, m in columns), *(_mean_std(stats.get(k)) for k in scalars)]
            for name, stats in groups.items()]
    note = 'Mean ± sample std over the models of each group (min, max and n in report.json).'
    return ['## Groups', '', note, ''] + _table(header, rows) + ['']


def _differences_markdown(differences: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The Paired differences table: a row per difference, 'mean ± std (t)' per score."""
    columns, scalars = _stats_columns(differences)

    def cell(stats):
        text = _mean_std(stats)
        return text + (f" (t {stats['t']:.2g})" if stats and 't' in stats else '')

    header = ['a - b', 'pairs', *(f'{k} {m}' for k, m in columns), *scalars]
    rows = [[name, str(len(stats['pairs'])), *(cell(stats.get(k, {}).get(m)) for k, m in columns),
             *(cell(stats.get(k)) for k in scalars)] for name, stats in differences.items()]
    note = ('Per pair (the i-th model of group a against the i-th of group b, e.g. the same seed): '
            'mean ± sample std of a - b, and the paired t statistic mean / (std / sqrt(n)); '
            'negative is better for a where lower is better.')
    return ['## Paired differences', '', note, ''] + _table(header, rows) + ['']


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
                metrics += [m for m in v if not is_nfe(m) and m not in metrics]
            elif k not in scalars and k != 'params':
                scalars.append(k)
    keys.sort(key=lambda k: k != ONE_STEP)
    with_params = any('params' in entry for entry in report.values())
    params = ['params'] if with_params else []
    lines = ['# Evaluation report', '', _legend(metrics), '']
    for metric in metrics:
        rows = []
        for name, entry in report.items():
            cells = [f'{format_value(entry[k].get(metric))} ({entry[k][nfe_key(metric, entry[k])]})'
                     if k in entry else '-' for k in keys]
            rows.append([name] + ([format_count(entry.get('params'))] if with_params else []) + cells)
        heading = f'## {metric} (higher is better)' if higher_is_better(metric) else f'## {metric}'
        lines += [heading, ''] + _table(['model'] + params + keys, rows) + ['']
    rows = [[name] + [format_value(entry.get(k)) for k in scalars] for name, entry in report.items()]
    lines += ['## straightness and baselines', ''] + _table(['model', *scalars], rows) + ['']
    for name, entry in info.items():
        if name not in ('groups', 'differences'):
            lines += [f'## {name}', ''] + _table(list(entry), [[format_value(v) for v in entry.values()]]) + ['']
    if info.get('groups'):
        lines += _groups_markdown(info['groups'])
    if info.get('differences'):
        lines += _differences_markdown(info['differences'])
    return '\n'.join(lines)


def save_figure(fig, path: epath.Path, title: str = '') -> None:
    """Writes a matplotlib figure as PNG (local or bucket path), with an optional title."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png')
    path.write_bytes(buf.getvalue())
