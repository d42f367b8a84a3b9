"""The image metric suite: Frechet distances (FID, fd_digits) in a metric network's features, and grids.

For every model and sampler, `eval.num_samples` images are generated from a fixed noise set
(the same for every model), embedded by the metric's network (Inception-v3 for `fid`, the
shipped digits classifier for `fd_digits`) in batches sharded over all devices, and compared
with the statistics of the real dataset, computed once and cached in the workdir. The report
also holds the floor: the distance of `eval.num_samples` real images to the same statistics.
Reconstructions and stored pairs (`fidelity`) are scored by PSNR and, with `eval.lpips`, LPIPS.

With several processes each one samples, reads and embeds only the rows of every batch that its
devices hold, and scores its own rows; the features and per-image scores are all-gathered in row
order (`sharding.gather`), never the images, so every process computes the same report.
"""

import functools
import hashlib
import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from flowjax import errors, progress, sharding
from flowjax.data import datasets, pixels
from flowjax.evaluation import fidelity, frechet, report
from flowjax.methods import method

_NOISE_SALT = 0xE7A1
_LABEL_SALT = 0x1AB
_FLOOR_SALT = 0xF100
_HELD_OUT_SALT = 0x4E1D  # the real images eval.reconstruction regenerates


def _load_fid(config: ml_collections.ConfigDict):
    from flowjax.metrics import inception

    module, variables = inception.load(config.eval.inception_weights, 'eval.inception_weights')
    return inception.feature_fn(module), variables


def _load_fd_digits(config: ml_collections.ConfigDict):
    del config
    from flowjax.metrics import digits_classifier

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
    count = config.eval.get('reconstruction', 0)
    if count and count > (available := datasets.num_images(config)):
        raise errors.ConfigError(f'eval.reconstruction={count}: more than the {available} images of data.image')
    mesh = sharding.data_mesh()
    sharding.check_batch_size(config.eval.batch_size, mesh, 'eval.batch_size')
    if config.eval.num_samples < 2:
        raise errors.ConfigError(f'eval.num_samples={config.eval.num_samples}: must be >= 2')
    if metric == 'fid':
        path = config.eval.get('inception_weights')
        if not path or not epath.Path(path).exists():
            from flowjax.metrics import inception

            inception.load(path, 'eval.inception_weights')  # raises the one-line "where to get it" error


class Embedder:
    """The metric network's features of images in batches of `batch_size` sharded over all devices: each
    process embeds the rows its devices hold and keeps their features (`share`); `features` gathers them."""

    def __init__(self, config: ml_collections.ConfigDict, mesh):
        self.metric = metric_name(config)
        features, variables = METRICS[self.metric](config)
        self._variables = jax.device_put(variables, sharding.replicated(mesh))
        self._sharding = NamedSharding(mesh, P('data'))
        self.batch_size = config.eval.batch_size
        self._fn = jax.jit(features)

    def share(self, x: jax.Array, count: int) -> sharding.Share:
        """This process's features of the first `count` images of a batch (a global array of batch_size rows)."""
        return sharding.share(self._fn(self._variables, jax.device_put(x, self._sharding)), count)

    def rows(self, count: int, read: Callable[[np.ndarray], np.ndarray], name: str = '') -> np.ndarray:
        """Features (count, D) float64 of images 0..count-1 on every process, `read(ids)` giving the images `ids`
        (float32): each process reads and embeds only the images its devices hold (padding rows are zeros). The
        progress is logged as `name` (default: '<metric> features')."""
        shares = []
        done = progress.Progress(name or f'{self.metric} features', count, unit='images')
        for lo in range(0, count, self.batch_size):
            valid = min(self.batch_size, count - lo)
            x = sharding.put_rows(lambda ids: np.asarray(read(lo + ids), np.float32), valid, self.batch_size,
                                  self._sharding)
            shares.append(self.share(x, valid))
            done.update(valid)
        logging.info('%s: features of %d of %d images extracted on process %d', self.metric, embedded(shares), count,
                     jax.process_index())
        return features(shares)


def embedded(shares: Sequence[sharding.Share]) -> int:
    """How many images this process embedded for `shares` (their rows it holds)."""
    return sum(len(s.ids) for s in shares)


def features(shares: Sequence[sharding.Share]) -> np.ndarray:
    """Every process's features of the batches of `shares`, in row order, float64 (on every process)."""
    return np.concatenate(sharding.gather(shares)).astype(np.float64)


def _stats_path(workdir: epath.Path, config: ml_collections.ConfigDict, metric: str) -> epath.Path:
    spec = {'data': datasets.image_spec(config), 'flip': datasets.flip(config), 'metric': metric}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return workdir / f'{metric}_stats_{digest}.npz'


def reference_statistics(config: ml_collections.ConfigDict, workdir: epath.Path,
                         embed: Embedder) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of every image of `data.image`, cached as `<metric>_stats_<hash>.npz`.

    With `data.flip` the model learns the flipped images too, so their mirror images join them. Each
    process reads and embeds its share of the images; the statistics are those of all their features.
    """
    path = _stats_path(workdir, config, embed.metric)
    if path.exists():
        with path.open('rb') as f, np.load(f) as z:
            return z['mu'], z['sigma']
    data, _ = datasets.load_images(config)
    n = len(data)
    mirrors = (False, True) if datasets.flip(config) else (False,)
    mu, sigma = frechet.statistics(np.concatenate([
        embed.rows(n, lambda ids, m=m: _mirror(datasets.take(data, ids), m),
                   f"{embed.metric} reference statistics{' (mirrored)' if m else ''}") for m in mirrors]))
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


def _real_floor(config: ml_collections.ConfigDict, embed: Embedder, mu: np.ndarray, sigma: np.ndarray) -> float:
    """The Frechet distance of `eval.num_samples` real images (flipped as training sees them) to (mu, sigma)."""
    data, _ = datasets.load_images(config)
    rng = np.random.default_rng([config.seed, _FLOOR_SALT])
    ids = rng.choice(len(data), min(config.eval.num_samples, len(data)), replace=False)
    flips = rng.random(len(ids)) < 0.5 if datasets.flip(config) else np.zeros(len(ids), bool)

    def read(rows: np.ndarray) -> np.ndarray:
        real = datasets.take(data, ids[rows])
        return np.where(flips[rows][:, None, None, None], real[:, :, ::-1], real)

    return frechet.frechet_distance(*frechet.statistics(embed.rows(len(ids), read, f'{embed.metric} real floor')),
                                    mu, sigma)


@functools.cache
def _noise_fn(shape: tuple[int, ...], batch: int, out_sharding):
    return jax.jit(lambda key: jax.random.normal(key, (batch, *shape)), out_shardings=out_sharding)


class ImageSuite:
    """The evaluation job's image part (the interface of `job.Suite`): chunks of `eval.batch_size`
    noise images, sharded over all devices and drawn from the seed, embedded chunk by chunk (each
    process its own rows), the features gathered once per sampler."""

    straightness_rows = 256  # of the first noise chunk
    diverged_straightness_as_null = False  # image reports have always kept a NaN straightness as NaN

    check = staticmethod(check)

    @classmethod
    def prepare(cls, config: ml_collections.ConfigDict, workdir: epath.Path) -> 'ImageSuite':
        """Loads the metric network and the reference statistics (cached in `workdir`) and scores the floor."""
        return cls(config, workdir)

    def __init__(self, config: ml_collections.ConfigDict, workdir: epath.Path):
        mesh = sharding.data_mesh()
        self.metric = metric_name(config)
        self.embed = Embedder(config, mesh) if METRICS[self.metric] else None
        self.grid = config.eval.grid
        self._n, self._batch = config.eval.num_samples, config.eval.batch_size
        self.num_samples = self._n
        self._key = jax.random.fold_in(jax.random.key(config.seed), _NOISE_SALT)
        self._label_key = jax.random.fold_in(self._key, _LABEL_SALT)
        self._noise = _noise_fn(datasets.sample_shape(config), self._batch, NamedSharding(mesh, P('data')))
        self._config, self._seed, self._sharding = config, config.seed, NamedSharding(mesh, P('data'))
        self._lpips = self._lpips_variables = None
        if method.eval_uses_lpips(config):
            from flowjax.metrics import lpips

            module, variables = lpips.from_config(config.lpips)
            self._lpips = jax.jit(lpips.distance_fn(module))
            self._lpips_variables = jax.device_put(variables, sharding.replicated(mesh))
        self.floor = {}
        if self.embed is not None:
            self._mu, self._sigma = reference_statistics(config, workdir, self.embed)
            self.floor = {f'{self.metric}_data': _real_floor(config, self.embed, self._mu, self._sigma)}

    def starts(self) -> Iterator[tuple[jax.Array, int]]:
        for i, lo in enumerate(range(0, self._n, self._batch)):
            yield self._noise(jax.random.fold_in(self._key, i)), min(self._batch, self._n - lo)

    def labels(self, chunk: int, classes: int) -> jax.Array:
        """Uniform class labels of a chunk, drawn from (seed, chunk)."""
        return jax.random.randint(jax.random.fold_in(self._label_key, chunk), (self._batch,), 0, classes)

    def measure(self, x1: jax.Array, valid: int) -> sharding.Share | None:
        """This process's features of the chunk's first `valid` samples (None without a metric network)."""
        return self.embed.share(x1, valid) if self.embed is not None else None

    def score(self, measures: list[sharding.Share | None], nfe: int) -> dict[str, Any]:
        """{'nfe', metric}: the Frechet distance of all chunks' features, gathered from every process (None if
        one is not finite)."""
        out = {'nfe': nfe}
        if self.embed is not None:
            logging.info('%s: features of %d of %d samples extracted on process %d', self.metric, embedded(measures),
                         sum(m.count for m in measures), jax.process_index())
            samples = features(measures)
            out[self.metric] = frechet.frechet_distance(
                *frechet.statistics(samples), self._mu, self._sigma) if np.isfinite(samples).all() else None
        return out

    def held_out(self, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        """`count` real images, as stored (never flipped), and their labels (None if the images have none):
        rows perm[:count] of a permutation of data.image drawn from (seed, salt), the same for every model."""
        rng = np.random.default_rng([self._seed, _HELD_OUT_SALT])
        ids = rng.permutation(datasets.num_images(self._config))[:count]
        return datasets.read_rows(self._config, ids, labels=True)

    def chunks(self, rows: Sequence[np.ndarray]) -> Iterator[tuple[tuple[jax.Array, ...], int]]:
        """Host rows in chunks of eval.batch_size sharded over all devices, as the starts are (the last
        chunk padded by repeating its last row), and how many rows of each are real."""
        count = len(rows[0])
        for lo in range(0, count, self._batch):
            valid = min(self._batch, count - lo)
            parts = [np.pad(r[lo:lo + valid], [(0, self._batch - valid)] + [(0, 0)] * (r.ndim - 1), mode='edge')
                     for r in rows]
            yield tuple(jax.device_put(p, self._sharding) for p in parts), valid

    def compare(self, x: jax.Array, target: jax.Array, valid: int) -> dict[str, np.ndarray]:
        """{'psnr'[, 'lpips']}: per image of the first `valid` rows, PSNR and (with eval.lpips) LPIPS, each
        process scoring its rows."""
        if self._lpips is None:
            return {'psnr': sharding.map_rows(fidelity.psnr, x, target, count=valid)}
        distance = self._lpips(self._lpips_variables, x, target)
        return sharding.map_rows(lambda a, b, d: {'psnr': fidelity.psnr(a, b), 'lpips': d.astype(np.float64)},
                                 x, target, distance, count=valid)

    def shown(self, x1: jax.Array, valid: int) -> np.ndarray:
        return sharding.head(x1, min(self.grid, valid))

    def panels(self, flow, shown: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        del flow  # a grid shows the samples only
        return shown

    def figure(self, path: epath.Path, results: Mapping[str, dict], panels: Mapping[str, Mapping[str, np.ndarray]],
               title: str) -> None:
        save_grids(path, panels, results, metric=self.metric, title=title)


def grid(x: np.ndarray, columns: int | None = None) -> np.ndarray:
    """Images (N, H, W, C) in [-1, 1] (or uint8 pixels) tiled into one uint8 (rows * H, columns * W, C) image."""
    x = np.asarray(x)
    x = x if x.dtype == np.uint8 else pixels.to_uint8(x)
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
    report.save_figure(fig, path, title)
