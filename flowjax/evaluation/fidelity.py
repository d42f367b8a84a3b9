"""Reconstruction and coupling preservation: model outputs compared with known targets (docs/methods.md, Metrics).

    reconstruction   held-out real data x1 inverted to noise and regenerated with the same sampler
                     (`kind.reconstruct`), compared with x1; `eval.reconstruction` examples
    preservation     the first `eval.preservation` stored pairs (x0, x1) of the coupling store
                     `eval.couplings`, sampled from x0 (`kind.sample`) and compared with the stored x1

Each is a `Task` (inputs, targets, labels); the job runs it per sampler and the data kind's suite
scores the outputs: toy data by the mean squared error (`mse`), images by PSNR (`psnr`) and, with
`eval.lpips`, by LPIPS (`lpips`). Report cells get `<task>_<score>` and `<task>_nfe`.
"""

import dataclasses

import ml_collections
import numpy as np

from flowjax import errors
from flowjax.data import couplings, datasets
from flowjax.methods import method

TASKS = ('reconstruction', 'preservation')  # the `eval` fields counting each task's examples
MSE_FLOOR = 1e-10  # PSNR's MSE is floored here (at most 100 dB), so identical images score a finite PSNR


@dataclasses.dataclass(frozen=True)
class Task:
    """Examples whose model outputs are compared with targets.

    name:    'reconstruction' (inputs regenerated through `kind.reconstruct`; targets are the inputs)
             or 'preservation' (inputs sampled through `kind.sample`).
    inputs:  float32 (N, ...) on the host; targets the same shape; labels int32 (N,) or None.
    source:  where the examples come from, for errors.
    """

    name: str
    inputs: np.ndarray
    targets: np.ndarray
    labels: np.ndarray | None
    source: str

    @property
    def round_trip(self) -> bool:
        return self.name == 'reconstruction'


def mse(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per example: the mean over dimensions of (x - y)^2, in float64."""
    d = np.asarray(x, np.float64) - np.asarray(y, np.float64)
    return np.mean(np.square(d), axis=tuple(range(1, d.ndim)))


UINT8_SCALE = 127.5  # images in [-1, 1] to [0, 255]: a difference of 2 / 255 is one uint8 level


def rmse(x: np.ndarray, y: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Per example: scale * sqrt(mean over dimensions of (x - y)^2), in float64 (images: scale UINT8_SCALE
    gives uint8 units, unrounded)."""
    return scale * np.sqrt(mse(x, y))


def psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per image: 10 log10(1 / MSE) of images in [-1, 1] mapped to [0, 1] by x / 2 + 1 / 2 (data range 1),
    the MSE floored at MSE_FLOOR; NaN where an image is not finite."""
    err = mse(np.asarray(x, np.float64) / 2 + 0.5, np.asarray(y, np.float64) / 2 + 0.5)
    return 10.0 * np.log10(1.0 / np.maximum(err, MSE_FLOOR))


def check(config: ml_collections.ConfigDict) -> None:
    """Static checks of eval.reconstruction, eval.preservation and eval.lpips (every method that evaluates)."""
    for field in TASKS:
        value = config.eval.get(field, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise errors.ConfigError(f'eval.{field}={value!r}: expected an int >= 0 (the number of examples; 0: off)')
    lpips = config.eval.get('lpips', False)
    if not isinstance(lpips, bool):
        raise errors.ConfigError(f'eval.lpips={lpips!r}: expected True or False')
    if lpips and config.data.kind != 'image':
        raise errors.ConfigError(f"eval.lpips=True: LPIPS scores images; data.kind={config.data.kind!r} is not 'image'")
    if lpips and not any(config.eval.get(field, 0) for field in TASKS):
        raise errors.ConfigError('eval.lpips=True: LPIPS scores reconstructions and stored pairs; set '
                                 'eval.reconstruction or eval.preservation > 0')
    if method.eval_uses_lpips(config):
        from flowjax.metrics import lpips as lpips_lib

        lpips_lib.check_config(config.lpips, datasets.sample_shape(config))


def check_store(config: ml_collections.ConfigDict) -> None:
    """The evaluate method's preservation fields: eval.couplings is set and, once its store exists,
    holds at least eval.preservation pairs."""
    count = config.eval.get('preservation', 0)
    if not count:
        return
    path = config.eval.get('couplings')
    if not path:
        raise errors.ConfigError(f'eval.preservation={count}: needs eval.couplings, the coupling store (or '
                                 'generate stage) whose first pairs are sampled')
    manifest = couplings.read_manifest(path)  # None until the generate stage has started
    if manifest is not None and manifest.get('num_pairs', 0) < count:
        _too_many(count, path, manifest.get('num_pairs', 0))


def _too_many(count: int, path: str, held: int) -> None:
    raise errors.ConfigError(f'eval.preservation={count}: more pairs than the {held} of the coupling store '
                             f'eval.couplings={path}')


def stored_pairs(config: ml_collections.ConfigDict) -> Task:
    """The preservation task: the first eval.preservation pairs (x0, x1[, label]) of eval.couplings."""
    count, path = config.eval.preservation, config.eval.couplings
    store = couplings.open_store(path)
    if store.num_pairs < count:
        _too_many(count, path, store.num_pairs)
    shape = datasets.sample_shape(config)
    if store.shape != shape:
        raise errors.UserError(f'eval.couplings={path}: the store holds pairs of shape {list(store.shape)}, '
                               f'the data examples of shape {list(shape)}')
    pairs = store.head(count)
    labels = pairs.get('label')
    return Task('preservation', pairs['x0'].astype(np.float32), pairs['x1'].astype(np.float32),
                None if labels is None else labels.astype(np.int32), f'eval.couplings={path}')


def tasks(config: ml_collections.ConfigDict, held_out) -> list[Task]:
    """The tasks `config.eval` asks for; `held_out(n) -> (x1, labels or None)` gives the suite's held-out data."""
    out = []
    if config.eval.get('reconstruction', 0):
        x1, labels = held_out(config.eval.reconstruction)
        source = 'data.image' if config.data.kind == 'image' else 'the held-out data'
        out.append(Task('reconstruction', x1, x1, labels, source))
    if config.eval.get('preservation', 0):
        out.append(stored_pairs(config))
    return out
