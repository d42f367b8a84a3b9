"""Image evaluation: Frechet distances (FID, fd_digits) per model and sampler, and sample grids.

For every model and sampler, `eval.num_samples` images are generated from a fixed noise set
(the same for every model), embedded by the metric's network (Inception-v3 for `fid`, the
shipped digits classifier for `fd_digits`) in batches sharded over all devices, and compared
with the statistics of the real dataset, computed once and cached in the workdir. The report
also holds the floor: the distance of `eval.num_samples` real images to the same statistics.
"""

import functools
import hashlib
import io
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from flowjax import errors, evaluate, frechet, sharding
from flowjax.data import datasets
from flowjax.flows import solvers

Apply = Callable[..., jax.Array]
_NOISE_SALT = 0xE7A1
_FLOOR_SALT = 0xF100
_STRAIGHTNESS_ROWS = 256


def _load_fid(config: ml_collections.ConfigDict):
    from flowjax.models import inception

    module, variables = inception.load(config.eval.inception_weights, 'eval.inception_weights')
    return inception.feature_fn(module), variables


def _load_fd_digits(config: ml_collections.ConfigDict):
    del config
    from flowjax.models import digits_classifier

    module, variables = digits_classifier.load()
    return digits_classifier.feature_fn(module), variables


# eval.metric -> loader of (features(variables, images) -> (B, D), variables); 'none': grids,
# NFE and straightness only (e.g. runlocal configs without the FID weights).
METRICS: dict[str, Callable[[ml_collections.ConfigDict], tuple[Callable, Any]] | None] = {
    'fid': _load_fid,
    'fd_digits': _load_fd_digits,
    'none': None,
}


def metric_name(config: ml_collections.ConfigDict) -> str:
    """`eval.metric`, by default fd_digits for the embedded digits and fid otherwise."""
    if config.eval.get('metric'):
        return config.eval.metric
    return 'fd_digits' if config.data.image.name == 'digits' else 'fid'


def check(config: ml_collections.ConfigDict) -> None:
    """Static checks of the image evaluation fields (the FID weights file must exist)."""
    metric = metric_name(config)
    if metric not in METRICS:
        raise errors.ConfigError(f"eval.metric={metric!r}: expected one of {', '.join(METRICS)}")
    if config.eval.grid < 1:
        raise errors.ConfigError(f'eval.grid={config.eval.grid}: must be >= 1')
    if not config.eval.samplers:
        return
    mesh = sharding.data_mesh()
    sharding.check_batch_size(config.eval.batch_size, mesh, 'eval.batch_size')
    if config.eval.num_samples < 2:
        raise errors.ConfigError(f'eval.num_samples={config.eval.num_samples}: must be >= 2')
    if metric == 'fid':
        path = config.eval.get('inception_weights')
        if not path or not epath.Path(path).exists():
            from flowjax.models import inception

            inception.load(path, 'eval.inception_weights')  # raises the one-line "where to get it" error


class Embedder:
    """`embed(images) -> (N, D)` features on the host, in sharded batches of `batch_size`."""

    def __init__(self, config: ml_collections.ConfigDict, mesh):
        self.metric = metric_name(config)
        features, variables = METRICS[self.metric](config)
        self._variables = jax.device_put(variables, sharding.replicated(mesh))
        self._sharding = NamedSharding(mesh, P('data'))
        self.batch_size = config.eval.batch_size
        self._fn = jax.jit(features)

    def __call__(self, x: np.ndarray | jax.Array) -> np.ndarray:
        """Every process passes the same images (numpy, or a global array) and gets all their features."""
        x = sharding.to_host(x)
        out = []
        for lo in range(0, len(x), self.batch_size):
            chunk = np.asarray(x[lo:lo + self.batch_size], np.float32)
            valid = len(chunk)
            if valid < self.batch_size:  # pad to the sharded batch; padding rows are dropped
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - valid, *chunk.shape[1:]), np.float32)])
            chunk = jax.device_put(chunk, self._sharding)
            out.append(sharding.to_host(self._fn(self._variables, chunk))[:valid])
        return np.concatenate(out).astype(np.float64)


def _stats_path(workdir: epath.Path, config: ml_collections.ConfigDict, metric: str) -> epath.Path:
    spec = {'data': config.data.image.to_dict(), 'flip': datasets.flip(config), 'metric': metric}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return workdir / f'{metric}_stats_{digest}.npz'


def reference_statistics(config: ml_collections.ConfigDict, workdir: epath.Path,
                         embed: Embedder) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of every image of `data.image`, cached as `<metric>_stats_<hash>.npz`.

    With `data.flip` the model learns the flipped images too, so their mirror images join them.
    """
    path = _stats_path(workdir, config, embed.metric)
    if path.exists():
        with path.open('rb') as f, np.load(f) as z:
            return z['mu'], z['sigma']
    data, _ = datasets.load_images(config)
    n, step = len(data), 8 * embed.batch_size
    mirrors = (False, True) if datasets.flip(config) else (False,)
    features = np.concatenate([embed(_mirror(datasets.take(data, np.arange(lo, min(lo + step, n))), m))
                               for m in mirrors for lo in range(0, n, step)])
    mu, sigma = frechet.statistics(features)
    if jax.process_index() == 0:
        buf = io.BytesIO()
        np.savez(buf, mu=mu, sigma=sigma, count=n)
        tmp = path.parent / f'.{path.name}.tmp'
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)
    logging.info('%s reference statistics of %d images cached in %s', embed.metric, n, path)
    return mu, sigma


def _mirror(x: np.ndarray, flip: bool) -> np.ndarray:
    return x[:, :, ::-1] if flip else x


@functools.cache
def _noise_fn(shape: tuple[int, ...], batch: int, out_sharding):
    return jax.jit(lambda key: jax.random.normal(key, (batch, *shape)), out_shardings=out_sharding)


def evaluate_images(config: ml_collections.ConfigDict, workdir: str | epath.Path,
                    models: Mapping[str, tuple[Apply, Any]]) -> dict:
    """Scores each model with each of `eval.samplers`; merges into the workdir's report.

    `models` maps a name to (apply, params) or, for a class-conditional model, (apply, params,
    num_classes). Report entry per model: {'params': count, sampler: {metric: value, 'nfe': n},
    'straightness', ..., '<metric>_data': the real-data floor}. Writes `samples.png`, a grid per model and sampler.
    """
    check(config)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.data_mesh()
    specs = evaluate.parse_samplers(config)
    metric, eps = metric_name(config), config.flow.t_eps
    embed = Embedder(config, mesh) if METRICS[metric] else None
    shape = datasets.sample_shape(config)
    n, batch = config.eval.num_samples, config.eval.batch_size
    key = jax.random.fold_in(jax.random.key(config.seed), _NOISE_SALT)
    noise = _noise_fn(shape, batch, NamedSharding(mesh, P('data')))

    if embed is not None:
        mu, sigma = reference_statistics(config, workdir, embed)
        data, _ = datasets.load_images(config)
        rng = np.random.default_rng([config.seed, _FLOOR_SALT])
        ids = rng.choice(len(data), min(n, len(data)), replace=False)
        real = datasets.take(data, ids)
        if datasets.flip(config):
            real = np.where(rng.random(len(real))[:, None, None, None] < 0.5, real[:, :, ::-1], real)
        floor = frechet.frechet_distance(*frechet.statistics(embed(real)), mu, sigma)

    results, grids = {}, {}
    for name, (apply, params, *classes) in models.items():
        entry, grids[name] = {'params': evaluate.parameter_count(params)}, {}
        apply, inputs = _with_labels(apply, params, classes[0] if classes else 0, key, batch)
        for spec in specs:
            run = solvers.make_sampler(apply, spec, eps=eps)
            features, nfes, first = [], [], None
            for i, lo in enumerate(range(0, n, batch)):
                x1, nfe = run(inputs(i), noise(jax.random.fold_in(key, i)))
                x1 = x1[:n - lo]
                first = sharding.to_host(x1[:config.eval.grid]) if first is None else first
                features.append(embed(x1) if embed is not None else None)
                nfes.append(int(nfe))
            entry[spec.key] = {'nfe': int(round(float(np.mean(nfes))))}
            if embed is not None:
                finite = all(np.isfinite(f).all() for f in features)
                entry[spec.key][metric] = frechet.frechet_distance(
                    *frechet.statistics(np.concatenate(features)), mu, sigma) if finite else None
            grids[name][spec.key] = first
            logging.info('evaluate %s %s: %s', name, spec.key, entry[spec.key])
        x0 = noise(jax.random.fold_in(key, 0))[:min(batch, _STRAIGHTNESS_ROWS)]
        xs, vs = evaluate.model_path(apply, config.eval.straightness_steps, eps)(inputs(0), x0)
        entry.update(evaluate.path_straightness(sharding.to_host(xs), sharding.to_host(vs), 1.0 - eps))
        if embed is not None:
            entry[f'{metric}_data'] = floor
        results[name] = entry

    report = {**evaluate.read_report(workdir), **results}
    if jax.process_index() == 0:
        evaluate.write_report(workdir, report)
        title = f'{config.method} on {datasets.describe(config)}'
        save_grids(workdir / 'samples.png', grids, results, metric=metric, title=title)
    sharding.barrier('flowjax-evaluate-report')  # the other processes find the files written
    return report


def _with_labels(apply: Apply, params: Any, classes: int, key: jax.Array, batch: int):
    """(apply, inputs(i)): for a class-conditional model, chunk i's samples get uniform labels
    drawn from (key, i), passed with the params so that one compiled sampler serves all chunks."""
    if not classes:
        return apply, lambda i: params
    label_key = jax.random.fold_in(key, 0x1AB)

    def conditional(inputs, x, t, dropout_rng=None):
        weights, labels = inputs
        return apply(weights, x, t, dropout_rng, label=labels[:len(x)])

    return conditional, lambda i: (params, jax.random.randint(jax.random.fold_in(label_key, i), (batch,), 0, classes))


def grid(x: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Images (N, H, W, C) in [-1, 1] tiled into one uint8 (rows * H, columns * W, C) image."""
    x = np.clip((np.asarray(x, np.float32) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    n, h, w, c = x.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = -(-n // columns)
    out = np.full((rows * (h + 1) - 1, columns * (w + 1) - 1, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, columns)
        out[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = x[i]
    return out


def save_grids(path: epath.Path, grids: Mapping[str, Mapping[str, np.ndarray]], results: Mapping[str, dict] | None,
               *, metric: str = '', title: str = '') -> None:
    """One PNG: a row per model, a panel per sampler, titled with its metric and NFE."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max(len(g) for g in grids.values())
    fig = Figure(figsize=(3.2 * cols, 3.4 * len(grids)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(grids), cols, squeeze=False)
    for row, (name, panels) in zip(axes, grids.items()):
        for ax, (key, x) in zip(row, panels.items()):
            tile = grid(x)
            ax.imshow(tile[..., 0] if tile.shape[-1] == 1 else tile, cmap='gray', vmin=0, vmax=255,
                      interpolation='nearest')
            label = f'{name}: {key}'
            if results is not None:
                m = results[name][key]
                value = m.get(metric)
                label += f'\n{metric} {value:.4g} (NFE {m["nfe"]})' if value is not None else f'\n(NFE {m["nfe"]})'
            ax.set_title(label, fontsize=9)
        for ax in row:
            ax.axis('off')
    evaluate.save_figure(fig, path, title)
