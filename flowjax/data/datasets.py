"""The data a config names, behind one interface for the methods: `data.kind` 'toy2d' or 'image'.

    data.kind = 'image'
    data.image = {'name': 'digits'}          # or tfds / npz / folder (see images.py)
    data.flip = True                          # random horizontal flip of training images
    data.classes = (0, 1)                     # only these labels' images (None: all)

Images are x1 (t = 1), NHWC in [-1, 1]; their noise x0 is a standard normal of the same shape.
"""

import functools
import json
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from flowjax import errors, models
from flowjax.data import images, toy2d

KINDS = ('toy2d', 'image')
Noise = Callable[[jax.Array, tuple[int, ...]], jax.Array]


def check(config: ml_collections.ConfigDict) -> None:
    """Static checks of `config.data` (names and parameters only: reads no files)."""
    kind = config.data.kind
    if kind not in KINDS:
        raise errors.ConfigError(f"data.kind={kind!r}: expected one of {', '.join(KINDS)}")
    check_classes(config)
    if kind == 'toy2d':
        toy2d.check_config(config)
        return
    if 'image' not in config.data:
        raise errors.ConfigError("data.image: data.kind='image' needs an image source, e.g. {'name': 'digits'}")
    images.check_spec(config.data.image, 'data.image')
    if config.data.source.name != 'normal' or len(config.data.source) > 1:
        raise errors.ConfigError(f"data.source={config.data.source.to_dict()}: images use {{'name': 'normal'}} noise")


def classes(config: ml_collections.ConfigDict) -> tuple[int, ...] | None:
    """`data.classes`: the class ids whose images are read, or None for all."""
    value = config.data.get('classes')
    return None if value is None else tuple(value)


def check_classes(config: ml_collections.ConfigDict) -> None:
    """`data.classes` is None or a non-empty tuple of distinct int ids, and only with image data
    (docs/methods.md, Rectified flow (1-RF), class subsets)."""
    value = config.data.get('classes')
    if value is None:
        return
    if (not isinstance(value, tuple | list) or not value or len(set(value)) != len(value)
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value)):
        raise errors.ConfigError(f'data.classes={value!r}: expected None (all) or a non-empty tuple of distinct '
                                 'class ids (ints >= 0)')
    if config.data.kind != 'image':
        raise errors.ConfigError(f"data.classes={tuple(value)!r}: class subsets need labelled images "
                                 f"(data.kind='image'), not data.kind={config.data.kind!r}")


def image_spec(config: ml_collections.ConfigDict) -> dict:
    """What the images read depend on, for manifests and caches: `data.image`, and `data.classes` when set."""
    spec = config.data.image.to_dict()
    return spec if classes(config) is None else {**spec, 'classes': list(classes(config))}


def take(data, ids: np.ndarray) -> np.ndarray:
    """Rows `ids` of a loaded image dataset (an array or a source on disk), float32 in [-1, 1]."""
    return images.as_source(data).take(ids)


@functools.lru_cache(maxsize=4)
def _load_images(spec_json: str, wanted: tuple[int, ...] | None):
    data, labels = images.load(ml_collections.ConfigDict(json.loads(spec_json)), 'data.image')
    if wanted is None:
        return data, labels
    if labels is None:
        raise errors.UserError(f'data.classes={wanted!r}: the images of data.image ({spec_json}) have no labels')
    labels = np.asarray(labels[np.arange(len(labels))], np.int32)
    missing = sorted(set(wanted) - set(np.unique(labels).tolist()))
    if missing:
        raise errors.UserError(f'data.classes={wanted!r}: no image of data.image ({spec_json}) has label '
                               f'{missing[0]} (labels {int(labels.min())}..{int(labels.max())})')
    rows = np.flatnonzero(np.isin(labels, wanted))
    if isinstance(data, np.ndarray):
        return data[rows], labels[rows]
    return images.Subset(data, rows), labels[rows]


def load_images(config: ml_collections.ConfigDict):
    """(images, labels) of `config.data.image`, only the images of `data.classes` when set (then in
    their stored order, the labels an array), loaded once per process: every reader of the images
    (training batches, forward pairs, evaluation) goes through here."""
    return _load_images(config.data.image.to_json(sort_keys=True), classes(config))


def sample_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The shape of one example: (2,) for toy 2D, (H, W, C) for images."""
    if config.data.kind == 'toy2d':
        return (2,)
    return tuple(int(d) for d in images.as_source(load_images(config)[0]).shape)


def num_images(config: ml_collections.ConfigDict) -> int:
    """N, the number of images of `config.data.image`."""
    return len(images.as_source(load_images(config)[0]))


def read_rows(config: ml_collections.ConfigDict, ids: np.ndarray,
              labels: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows `ids` of `config.data.image` as they are stored (float32 in [-1, 1], never flipped) and,
    if `labels`, their int32 labels (None when the images have none)."""
    data, all_labels = load_images(config)
    source = images.as_source(data)
    if labels and all_labels is not None and all_labels is source.labels:  # read with the rows
        return source.read(ids, True)
    x = source.take(ids)
    return x, (np.asarray(all_labels[ids], np.int32) if labels and all_labels is not None else None)


def noise(config: ml_collections.ConfigDict) -> Noise:
    """x0 for a loss: `(key, shape) -> x0` from `config.data.source`."""
    if config.data.kind == 'toy2d':
        return toy2d.source_sampler(config.data.source)
    return lambda key, shape: jax.random.normal(key, shape, jax.numpy.float32)


def flip(config: ml_collections.ConfigDict) -> bool:
    return bool(config.data.get('flip', True))


def make_batches(config: ml_collections.ConfigDict, mesh: Mesh, batch_size: int,
                 seed: int) -> Callable[[int], dict[str, jax.Array]]:
    """`batches(step) -> {'x1'[, 'label']}` of real data, global arrays sharded along 'data'."""
    if config.data.kind == 'toy2d':
        return toy2d.make_batches(config.data.target, mesh, batch_size, seed)
    data, labels = load_images(config)
    classes = models.num_classes(config.model)
    if classes and labels is None:
        raise errors.UserError(f'model.num_classes={classes}: the images of data.image '
                               f'({config.data.image.to_dict()}) have no labels')
    if classes and labels.size and labels.max() >= classes:
        raise errors.UserError(f'model.num_classes={classes}: data.image has label {int(labels.max())}')
    return images.make_batches(data, labels if classes else None, mesh, batch_size, seed, flip=flip(config))


def make_noise_batches(config: ml_collections.ConfigDict, mesh: Mesh, batch_size: int,
                       seed: int) -> Callable[[int], dict[str, jax.Array]]:
    """`batches(step) -> {'x0'[, 'label']}`: noise (and uniform class labels for a conditional
    model), drawn on device from (seed, step)."""
    if config.data.kind == 'toy2d':
        return toy2d.make_batches(config.data.source, mesh, batch_size, seed, field='x0')
    shape = sample_shape(config)
    classes = models.num_classes(config.model)
    key = jax.random.fold_in(jax.random.key(seed), 0x50CE)
    out = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))

    @functools.partial(jax.jit, out_shardings=out)
    def batch_at(step):
        k_x, k_y = jax.random.split(jax.random.fold_in(key, step))
        batch = {'x0': jax.random.normal(k_x, (batch_size, *shape))}
        if classes:
            batch['label'] = jax.random.randint(k_y, (batch_size,), 0, classes)
        return batch

    return lambda step: batch_at(jax.numpy.asarray(step, jax.numpy.int32))


def describe(config: ml_collections.ConfigDict) -> str:
    """A short name of the data for titles, e.g. 'moons' or 'digits'."""
    if config.data.kind == 'toy2d':
        return config.data.target.name
    spec = config.data.image
    return spec.get('dataset') or spec.name
