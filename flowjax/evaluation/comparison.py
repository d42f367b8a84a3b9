"""The table of methods: every method's students on one teacher, matched by NFE (docs/methods.md, Method table).

Input: an evaluation report (`report.py`: model -> {'params', sampler key -> {metric, 'nfe', fidelity
scores}, 'straightness'}), the methods as chains of stages per seed (`seed i` of a method: the stages
that made its model, the last of them the evaluated one; e.g. annealing reflow then distillation), and
what each finished stage cost (`Cost`: training steps from its export, wall seconds from its stage.json).

Each quality column is one NFE, not one sampler: a method's cell at NFE n is its first sampler of
`samplers` whose report cell says n NFE (CAF's caf@1 costs 2 NFE, a PeRFlow student's euler@4 with 4
windows costs 4), so every column compares methods at the same number of network evaluations. A
method has no cell where none of its samplers costs n.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from etils import epath

from flowjax import errors
from flowjax.evaluation import report

TASKS = ('preservation', 'reconstruction')
FIDELITY_SCORES = ('psnr', 'mse')  # the fidelity score shown: the first a report has (images: psnr, toy: mse)


@dataclasses.dataclass(frozen=True)
class Cost:
    """What a finished stage cost: its export's training steps and the wall seconds of the run that
    finished it (compile, training, export; None where unknown, e.g. a stage stood in by a checkpoint)."""

    steps: int | None
    seconds: float | None


def _cell_at(entry: Mapping[str, Any], samplers: Sequence[str], nfe: int) -> tuple[str | None, Mapping | None]:
    """(sampler key, report cell) of the first of `samplers` whose cell in `entry` costs `nfe` NFE."""
    for key in samplers:
        cell = entry.get(key)
        if isinstance(cell, Mapping) and cell.get('nfe') == nfe:
            return key, cell
    return None, None


def _total(values: Sequence[Any]) -> Any:
    return None if any(v is None for v in values) else sum(values)


def default_metric(report_: Mapping[str, Any], model: str) -> str:
    """The quality metric of the table when none is given: the first score of the model's first sampler
    cell that is not a fidelity score (w2 on toy data, fd_digits / fid on images)."""
    for cell in report_[model].values():
        if isinstance(cell, Mapping):
            for name in cell:
                if not report.is_nfe(name) and name.partition('_')[0] not in report.FIDELITY_TASKS:
                    return name
    raise errors.UserError(f'compare: model {model!r} has no sampler scores in the report')


def fidelity_score(report_: Mapping[str, Any]) -> str | None:
    """The fidelity score the report holds ('psnr' for images, 'mse' for toy data), None without any."""
    names = {m for entry in report_.values() if isinstance(entry, Mapping)
             for cell in entry.values() if isinstance(cell, Mapping) for m in cell}
    for score in FIDELITY_SCORES:
        if any(f'{task}_{score}' in names for task in TASKS):
            return score
    return None


def _seed_values(entry: Mapping[str, Any], chain: Sequence[str], costs: Mapping[str, Cost],
                 samplers: Sequence[str], nfes: Sequence[int], metric: str, score: str | None) -> dict[str, Any]:
    """One seed's values: quality, fidelity per NFE column (with the sampler used), straightness and cost."""
    values: dict[str, Any] = {'params': entry.get('params'), 'steps': _total([costs[s].steps for s in chain]),
                              'seconds': _total([costs[s].seconds for s in chain]),
                              'straightness': entry.get('straightness'), 'samplers': {}}
    for n in nfes:
        key, cell = _cell_at(entry, samplers, n)
        values['samplers'][n] = key
        values.setdefault('quality', {})[n] = None if cell is None else cell.get(metric)
        for task in TASKS:
            values.setdefault(task, {})[n] = None if cell is None or score is None else cell.get(f'{task}_{score}')
    return values


def _present(cells: Sequence[Any]) -> bool:
    """Whether any seed has the cell (a method without a sampler at an NFE has none)."""
    return any(c is not None for c in cells)


def _summary(seeds: Sequence[dict[str, Any]], nfes: Sequence[int]) -> dict[str, Any]:
    """Mean / sd / min / max / n over seeds of every value (report._statistics), None where no seed has it."""

    def stats(values):
        return report._statistics(values) if _present(values) else None

    row = {'params': report._common([s['params'] for s in seeds]),
           'samplers': {n: report._common([s['samplers'][n] for s in seeds]) for n in nfes},
           'steps': stats([s['steps'] for s in seeds]), 'seconds': stats([s['seconds'] for s in seeds]),
           'straightness': stats([s['straightness'] for s in seeds])}
    for part in ('quality', *TASKS):
        row[part] = {n: stats([s[part][n] for s in seeds]) for n in nfes}
    return row


def _paired(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], nfes: Sequence[int]) -> dict[str, Any]:
    """Seed-by-seed differences a_i - b_i of every NFE-matched value and the straightness (report._paired)."""

    def diff(x, y):
        if not (_present(x) and _present(y)):
            return None
        return report._paired([report._difference(u, v) for u, v in zip(x, y)])

    out = {'straightness': diff([s['straightness'] for s in a], [s['straightness'] for s in b])}
    for part in ('quality', *TASKS):
        out[part] = {n: diff([s[part][n] for s in a], [s[part][n] for s in b]) for n in nfes}
    return out


def method_table(report_: Mapping[str, Any], methods: Mapping[str, Sequence[Sequence[str]]],
                 costs: Mapping[str, Cost], *, nfes: Sequence[int], samplers: Mapping[str, Sequence[str]],
                 default_samplers: Sequence[str], baseline: str, parts: Mapping[str, Sequence[str]],
                 metric: str | None = None) -> dict[str, Any]:
    """The comparison: {'metric', 'score', 'nfes', 'baseline', 'methods': {name: its summary over seeds, 'models'
    and 'seeds' (each seed's values)},
    'differences': {'<a> - <b>': paired differences and 'pairs'}}, the differences of every method
    with as many seeds as `baseline` against it, and of every composition of `parts` against each part."""
    for name, chains in methods.items():
        for chain in chains:
            if chain[-1] not in report_:
                raise errors.UserError(f'compare.methods.{name}: model {chain[-1]!r} is not in the evaluation report '
                                       f"(models: {', '.join(k for k in report_ if k not in report.INFO_SECTIONS)})")
    if metric is not None:
        scored = {m for entry in report_.values() if isinstance(entry, Mapping) for cell in entry.values()
                  if isinstance(cell, Mapping) for m in cell if not report.is_nfe(m)}
        if metric not in scored:
            raise errors.UserError(f"compare.metric={metric!r}: no model of the evaluation report has it (its scores: "
                                   f"{', '.join(sorted(scored))})")
    metric = metric or default_metric(report_, methods[baseline][0][-1])
    score = fidelity_score(report_)
    seeds = {name: [_seed_values(report_[chain[-1]], chain, costs, samplers.get(name, default_samplers), nfes,
                                 metric, score) for chain in chains] for name, chains in methods.items()}
    rows = {name: {**_summary(values, nfes), 'models': [chain[-1] for chain in methods[name]], 'seeds': values}
            for name, values in seeds.items()}
    pairs = [(name, baseline) for name in methods if name != baseline and len(methods[name]) == len(methods[baseline])]
    pairs += [(name, part) for name, of in parts.items() for part in of]
    differences = {f'{a} - {b}': {**_paired(seeds[a], seeds[b], nfes),
                                  'pairs': [[x[-1], y[-1]] for x, y in zip(methods[a], methods[b])]} for a, b in pairs}
    return {'metric': metric, 'score': score, 'nfes': list(nfes), 'baseline': baseline, 'methods': rows,
            'differences': differences}


def _cell(stats: Mapping[str, Any] | None, paired: bool = False) -> str:
    """'mean ± sd' (report._mean_std; the value alone for one seed), with ' (t ...)' for a paired difference."""
    if stats is None:
        return '-'
    if stats['n'] == 1 and not stats.get('failed'):
        return report.format_value(stats['mean'])
    return report._mean_std(stats) + (f" (t {stats['t']:.2g})" if paired and 't' in stats else '')


def _seconds(stats: Mapping[str, Any] | None) -> str:
    return '-' if stats is None or stats['mean'] is None else f"{stats['mean']:.0f} ± {stats['std']:.0f}"


def _steps(stats: Mapping[str, Any] | None) -> str:
    return '-' if stats is None or stats['mean'] is None else f"{stats['mean']:.0f}"


def markdown(table: Mapping[str, Any], title: str) -> str:
    """report.md of the comparison: methods, paired differences, the samplers behind each NFE column."""
    metric, score, nfes = table['metric'], table['score'], table['nfes']
    higher = score is not None and report.higher_is_better(score)
    lines = [f'# {title}', '',
             f"Rows: methods, each over its seeds (n): mean ± sample sd. {metric} at NFE {', '.join(map(str, nfes))}: "
             "each column one number of network evaluations, the method's sampler for it in the Samplers table "
             "('-': none of its samplers costs that NFE). params: of the evaluated model (CAF: both networks). "
             "steps: training steps of every stage that made the model (a distilled student counts its 2-RF or "
             "annealing stage too). time: wall seconds of those stages (compile, training, export) on this machine. "
             'straightness: mean over t of E||(z1 - z0) - v(z_t, t)||^2 on an Euler path. '
             + (f'preservation / reconstruction ({score}, {"higher" if higher else "lower"} is better): the first '
                'stored pairs sampled from their x0 against their x1, and held-out data inverted and regenerated, '
                'with the same NFE column\'s sampler (the round trip costs twice its NFE). ' if score else '')
             + f'{metric} and straightness: lower is better.', '']
    fidelity = [f'{task} {score} NFE {n}' for task in TASKS for n in nfes] if score else []
    header = ['method', 'n', 'params', 'steps', 'time (s)', *(f'{metric} NFE {n}' for n in nfes), 'straightness']
    rows = []
    for name, row in table['methods'].items():
        rows.append([name, str(len(row['models'])), report.format_count(row['params']), _steps(row['steps']),
                     _seconds(row['seconds']), *(_cell(row['quality'][n]) for n in nfes), _cell(row['straightness'])])
    lines += ['## Methods', ''] + report._table(header, rows) + ['']
    if fidelity:
        rows = [[name, *(_cell(row[task][n]) for task in TASKS for n in nfes)]
                for name, row in table['methods'].items()]
        lines += ['## Fidelity', ''] + report._table(['method', *fidelity], rows) + ['']
    if table['differences']:
        header = ['a - b', 'pairs', *(f'{metric} NFE {n}' for n in nfes), 'straightness',
                  *(f'{task} NFE {n}' for task in TASKS for n in nfes if score)]
        rows = [[name, str(len(d['pairs'])), *(_cell(d['quality'][n], True) for n in nfes),
                 _cell(d['straightness'], True), *(_cell(d[task][n], True) for task in TASKS for n in nfes if score)]
                for name, d in table['differences'].items()]
        note = (f"Seed by seed (the i-th model of a against the i-th of b): mean ± sample sd of a - b and the "
                f"paired t statistic mean / (sd / sqrt(n)); for {metric} and straightness negative favours a"
                + (f", for {score} {'positive' if higher else 'negative'} does" if score else '') + '.')
        lines += ['## Paired differences', '', note, ''] + report._table(header, rows) + ['']
    rows = [[name, *((row['samplers'][n] or '-') for n in nfes)] for name, row in table['methods'].items()]
    lines += ['## Samplers', '', 'The sampler behind each NFE column.', '']
    lines += report._table(['method', *(f'NFE {n}' for n in nfes)], rows) + ['']
    return '\n'.join(lines)


LOG_SPAN = 20  # quality_nfe.png's quality axis is logarithmic when the means span more than this factor


def log_quality(means) -> bool:
    """Whether quality_nfe.png plots `means` on a log axis: all positive, spanning more than LOG_SPAN."""
    return bool(means) and min(means) > 0 and max(means) > LOG_SPAN * min(means)


def figure(path: epath.Path, table: Mapping[str, Any], title: str) -> None:
    """Quality against NFE: a line per method, its seeds' mean with ± sd bars, NFE on a log axis (and
    quality too when every mean is positive and they span more than LOG_SPAN)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    means = []
    for name, row in table['methods'].items():
        points = [(n, s['mean'], s['std']) for n, s in row['quality'].items()
                  if s is not None and s['mean'] is not None]
        if not points:
            continue
        n, mean, std = (np.array(v, float) for v in zip(*points))
        means.extend(mean)
        width = 2.5 if name == table['baseline'] else 1.2
        ax.errorbar(n, mean, yerr=std, marker='o', capsize=3, linewidth=width, label=name)
    nfes = table['nfes']
    ax.set_xscale('log', base=2)
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.set_xlim(min(nfes) / math.sqrt(2), max(nfes) * math.sqrt(2))
    ax.set_xlabel('NFE')
    if log_quality(means):  # e.g. a teacher at 1 NFE far above its students
        ax.set_yscale('log')
    ax.set_ylabel(f"{table['metric']} (lower is better)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    report.save_figure(fig, path, title)
