"""The toy 2D metric suite: samples scored against held-out point clouds, and the scatter figure.

The metrics are the exact 2-Wasserstein distance and the energy distance to a held-out sample of
the target; their floor is the same distances between two held-out samples. Every model starts
from one fixed source batch, sampled in one chunk. Reconstructions (of the held-out sample's
first points) and stored pairs (`fidelity`) are scored by the mean squared error.

The chunk stays on one device of each process, which samples and scores all of it: rk45 steps the
whole batch by one error norm, and sharding it would change that norm's rounding (and with it the
step sequence) with the device count, while each toy report is bit for bit the same on any number
of devices and processes.
"""

import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from scipy import optimize, spatial

from flowjax import errors, sharding
from flowjax.data import toy2d
from flowjax.evaluation import fidelity, report

_HELD_OUT_SALT = 0xE7A1
_PLOT_TRAJECTORY_STEPS = 50


def w2(x: np.ndarray, y: np.ndarray) -> float:
    """Exact 2-Wasserstein distance between two equal-weight point clouds of the same size.

    With uniform weights and equal counts an optimal transport plan is a permutation (a vertex of
    the Birkhoff polytope), so the assignment that minimises the summed squared Euclidean distance
    gives W2^2 = mean of its squared distances. The terms (each weighted 1/n) are added one after
    another from the last point of `x` to the first: the order the reports have always been summed
    in, so a report's W2 is the same to the last bit.
    """
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    if len(x) != len(y):
        raise ValueError(f'w2: point clouds of {len(x)} and {len(y)} points; it compares clouds of equal size')
    cost = spatial.distance.cdist(x, y, 'sqeuclidean')  # Exact zeros on ties.
    # The same assignment on standardised clouds: |x_i - y_j|^2 differs from -2 x_i . y_j only by
    # terms of i or j alone, so centring and scaling each cloud keeps the optimum; far-apart or
    # differently spread clouds (a poor model) solve about ten times faster.
    standardized = spatial.distance.cdist(_standardized(x), _standardized(y), 'sqeuclidean')
    rows, cols = optimize.linear_sum_assignment(standardized)
    terms = cost[rows, cols] * (1.0 / len(x))
    value = np.add.accumulate(terms[::-1])[-1] if len(terms) else 0.0
    return math.sqrt(max(float(value), 0.0))


def _standardized(x: np.ndarray) -> np.ndarray:
    """`x` less its mean, divided by its root-mean-square norm (where that is not zero)."""
    x = x - x.mean(axis=0)
    scale = math.sqrt(float((x * x).sum(axis=1).mean())) if len(x) else 0.0
    return x / scale if scale > 0 else x


def _mean_distance(x: np.ndarray, y: np.ndarray) -> float:
    """E|X - Y| over all pairs (V-statistic)."""
    return float(spatial.distance.cdist(x, y, 'euclidean').mean())


def energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    """Energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistics, no square root)."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    value = 2.0 * _mean_distance(x, y) - _mean_distance(x, x) - _mean_distance(y, y)
    return max(float(value), 0.0)


def held_out_sets(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source, data, data_b): `eval.num_samples` points of `data.source` and two held-out samples
    of `data.target`, fixed by the seed."""
    n = config.eval.num_samples
    key = jax.random.fold_in(jax.random.key(config.seed), _HELD_OUT_SALT)
    source = toy2d.sample(config.data.source, jax.random.fold_in(key, 0), n, 'data.source')
    data = toy2d.sample(config.data.target, jax.random.fold_in(key, 1), n)
    data_b = toy2d.sample(config.data.target, jax.random.fold_in(key, 2), n)
    return source, data, data_b


class PointCloudSuite:
    """The evaluation job's toy 2D part (the interface of `job.Suite`)."""

    straightness_rows = None  # the straightness path runs on the whole source batch
    diverged_straightness_as_null = True

    @staticmethod
    def check(config: ml_collections.ConfigDict) -> None:
        """eval.reconstruction takes points of the held-out sample (`job.check_data` checks the rest)."""
        count, available = config.eval.get('reconstruction', 0), config.eval.num_samples
        if config.eval.samplers and count > available:
            raise errors.ConfigError(f'eval.reconstruction={count}: more than the {available} points of the '
                                     'held-out sample (eval.num_samples)')

    @classmethod
    def prepare(cls, config: ml_collections.ConfigDict, workdir: epath.Path) -> 'PointCloudSuite':
        del workdir  # nothing is cached
        return cls(*held_out_sets(config), trajectory_count=config.eval.trajectories)

    def __init__(self, source: np.ndarray, data: np.ndarray, data_b: np.ndarray, *, trajectory_count: int = 16):
        if not len(source) == len(data) == len(data_b):  # w2 compares clouds of equal size
            raise errors.UserError(f'toy evaluation: source, data and data_b have {len(source)}, {len(data)} and '
                                   f'{len(data_b)} points; they must have the same number')
        self.source = np.asarray(source, np.float32)
        self.data = np.asarray(data, np.float64)
        self.trajectory_count = trajectory_count
        self._data_b = data_b
        self._x0 = jnp.asarray(self.source)
        self.num_samples = len(self.source)

    @functools.cached_property
    def floor(self) -> dict[str, float]:
        """The held-out data's distances to a second held-out sample (computed when first read: the
        inversion job reads the suite's held-out data and chunks only)."""
        return {'w2_data': w2(self.data, self._data_b), 'energy_data': energy_distance(self.data, self._data_b)}

    def starts(self) -> Iterator[tuple[jax.Array, int]]:
        yield self._x0, len(self._x0)

    def labels(self, chunk: int, classes: int) -> jax.Array:
        raise errors.ConfigError(f"model.num_classes={classes}: class labels need data.kind='image'")

    def measure(self, x1: jax.Array, valid: int) -> np.ndarray:
        return sharding.to_host(x1)[:valid]

    def score(self, measures: list[np.ndarray], nfe: int) -> dict[str, Any]:
        """{'w2', 'energy', 'nfe'} of one sampler's output against the held-out data."""
        x1 = np.concatenate(measures)
        if not np.all(np.isfinite(x1)):  # e.g. rk45 hit max_steps and returned NaNs.
            return {'w2': None, 'energy': None, 'nfe': nfe}
        return {'w2': report.finite_or_none(w2(x1, self.data)),
                'energy': report.finite_or_none(energy_distance(x1, self.data)), 'nfe': nfe}

    def held_out(self, count: int) -> tuple[np.ndarray, None]:
        """The first `count` points of the held-out data sample (the one w2 and energy compare with); no labels."""
        return self.data[:count].astype(np.float32), None

    def chunks(self, rows: Sequence[np.ndarray]) -> Iterator[tuple[tuple[jax.Array, ...], int]]:
        """Host rows in one chunk, placed as the starts are."""
        yield tuple(jnp.asarray(r) for r in rows), len(rows[0])

    def compare(self, x: jax.Array, target: jax.Array, valid: int) -> dict[str, np.ndarray]:
        """{'mse'}: per example, the mean over dimensions of the squared error of its first `valid` rows."""
        return {'mse': fidelity.mse(sharding.to_host(x)[:valid], sharding.to_host(target)[:valid])}

    def shown(self, x1: jax.Array, valid: int) -> np.ndarray:
        return sharding.to_host(x1)[:valid]

    def panels(self, flow, shown: Mapping[str, np.ndarray]) -> tuple[Mapping[str, np.ndarray], np.ndarray]:
        """The model's samples per sampler and its Euler trajectories from the first sources."""
        paths, _ = flow.path(_PLOT_TRAJECTORY_STEPS, self._x0[:self.trajectory_count], 0)
        return shown, np.asarray(paths)

    def figure(self, path: epath.Path, results: Mapping[str, dict], panels: Mapping[str, tuple], title: str) -> None:
        plot_samples(path, results, panels, source=self.source, data=self.data, title=title)


def _panel_keys(samples: Mapping[str, np.ndarray]) -> list[str]:
    """The first and last sampler evaluated (e.g. euler@1 and rk45), without repeats."""
    keys = list(samples)
    return list(dict.fromkeys(keys[:1] + keys[-1:]))


def plot_samples(path: epath.Path, results: Mapping[str, dict], plots: Mapping[str, tuple],
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
            ax.set_title(f'{name}: {key} (NFE {m["nfe"]})\nw2 {report.format_value(m["w2"])}', fontsize=10)
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
    report.save_figure(fig, path, title)
