"""Image datasets for flows: x1 images NHWC float32 in [-1, 1] (t = 1 is data).

A config names a source by `name` and sets its parameters, e.g. `{'name': 'digits'}`,
`{'name': 'npz', 'path': 'gs://bucket/cifar.npz'}`, `{'name': 'folder', 'path': ..., 'size': 64}`
or `{'name': 'tfds', 'dataset': 'cifar10'}`. The small sources load into memory as float32
arrays; a tfds dataset stays on disk (array_record files, read at random by `tfds.data_source`,
no TensorFlow) as a `TfdsImages`, which decodes the rows a batch needs (`take`). Batches are
stateless in the step and reuse the coupling reader's shuffled-stream indexing; `make_batches`
reads the next steps' batches ahead in grain threads.
"""

import inspect
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from flowjax import errors, sharding
from flowjax.data import pixels, stream

if TYPE_CHECKING:
    from flowjax.data.tfds_images import SourceLabels, TfdsImages

# (images, labels): in memory, or a tfds dataset on disk and its labels' view.
Dataset = tuple['np.ndarray | TfdsImages', 'np.ndarray | SourceLabels | None']
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
_FLIP_SALT = 0xF11B
_GRAY_MODES = ('1', 'L', 'LA')


def digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits: (1797, 8, 8, 1) in [-1, 1], labels 0..9 (no download)."""
    from sklearn import datasets  # Imported lazily: only this source needs it.

    data = datasets.load_digits()
    images = data.images.astype(np.float32)[..., None] / 8.0 - 1.0
    return images, data.target.astype(np.int32)


def load_npz(path: str, field: str | None = None) -> Dataset:
    """uint8 images (N, H, W[, C]) from a .npz (local or bucket) and its optional `labels`.

    `field` names the image array; by default `images`, or the only array besides `labels`.
    """
    file = epath.Path(path)
    if not file.exists():
        raise errors.UserError(f'{file}: no such .npz file')
    try:
        with file.open('rb') as f, np.load(f, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as e:  # Not a zip, truncated, pickled members: all unreadable to us.
        raise errors.UserError(f"{file}: unreadable .npz ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if field is None:
        others = [name for name in arrays if name != 'labels']
        field = 'images' if 'images' in arrays or len(others) != 1 else others[0]
    if field not in arrays:
        raise errors.UserError(f'{file}: no array {field!r} (it holds {", ".join(arrays) or "nothing"})')
    images = arrays[field]
    if images.dtype != np.uint8:
        raise errors.UserError(f'{file}: {field} has dtype {images.dtype}, expected uint8')
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or not len(images):
        raise errors.UserError(
            f'{file}: {field} has shape {arrays[field].shape}, expected (N, H, W) or (N, H, W, 1|3) with N > 0')
    labels = arrays.get('labels')
    if labels is not None:
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise errors.UserError(f'{file}: labels have shape {labels.shape} and dtype {labels.dtype}, '
                                   f'expected {len(images)} integers (one per image)')
        labels = labels.astype(np.int32)
    return pixels.from_uint8(images), labels


def _image_files(root: epath.Path) -> list[epath.Path]:
    """PNG / JPEG files under `root`, recursively (epath has no rglob on every backend)."""
    found = []
    for child in root.iterdir():
        if child.is_dir():
            found.extend(_image_files(child))
        elif child.suffix.lower() in IMAGE_SUFFIXES:
            found.append(child)
    return found


def load_folder(path: str, size: int | None = None) -> Dataset:
    """Every PNG / JPEG under `path` (recursive, sorted), optionally resized to size x size.

    All images become RGB unless every one is grayscale. No labels.
    """
    from PIL import Image  # Imported lazily: only this source decodes files.

    root = epath.Path(path)
    if not root.is_dir():
        raise errors.UserError(f'{root}: no such image folder')
    files = sorted(_image_files(root), key=str)
    if not files:
        raise errors.UserError(f'{root}: no images found (expected {", ".join(IMAGE_SUFFIXES)} files)')
    out, first = [], None
    for file in files:
        try:
            with file.open('rb') as f, Image.open(f) as image:
                image = image.convert('L' if image.mode in _GRAY_MODES else 'RGB')
        except Exception as e:  # Pillow raises several kinds for a bad file.
            detail = ' '.join(str(e).split())
            raise errors.UserError(f'{file}: unreadable image ({type(e).__name__}: {detail})') from None
        if size is not None:
            image = image.resize((size, size), Image.Resampling.LANCZOS)
        elif first is None:
            first = (file, image.size)
        elif image.size != first[1]:
            raise errors.UserError(f'{file}: size {image.size} differs from {first[1]} of {first[0].name}; '
                                   'set data.image.size to resize all images')
        out.append(np.asarray(image, np.uint8).reshape(image.size[1], image.size[0], -1))
    channels = max(a.shape[-1] for a in out)  # RGB unless every image is grayscale.
    out = [np.repeat(a, channels // a.shape[-1], axis=-1) for a in out]
    return pixels.from_uint8(np.stack(out)), None


def _load_tfds(dataset: str, split: str = 'train', data_dir: str | None = None, image_key: str = 'image',
               label_key: str | None = 'label') -> Dataset:
    """A prepared tfds dataset on disk (see tfds_images.load_tfds)."""
    from flowjax.data import tfds_images  # Imported lazily: tfds loads slowly.

    return tfds_images.load_tfds(dataset, split, data_dir, image_key, label_key)


PREFETCH = 2  # Batches `make_batches` reads ahead for a source on disk.
_LAST_STEP = 2**62


SOURCES: dict[str, Callable[..., Dataset]] = {
    'digits': digits,
    'npz': load_npz,
    'folder': load_folder,
    'tfds': _load_tfds,
}


def load(spec: ml_collections.ConfigDict, field: str = 'data.image') -> Dataset:
    """(images, labels or None) from the source a config spec names; `field` names it in errors."""
    name, params = check_spec(spec, field)
    return SOURCES[name](**params)


def check_spec(spec: ml_collections.ConfigDict, field: str = 'data.image') -> tuple[str, dict]:
    """(source name, parameters) of a spec whose source exists and takes those parameters."""
    params = dict(spec)
    name = params.pop('name', None)
    if name not in SOURCES:
        raise errors.ConfigError(f"{field}.name: unknown image source {name!r} (expected one of {', '.join(SOURCES)})")
    signature = inspect.signature(SOURCES[name]).parameters
    for p in params:
        if p not in signature:
            raise errors.ConfigError(
                f"{field}.{p}: not a parameter of {name!r} (it takes {', '.join(signature) or 'none'})")
    for p, param in signature.items():
        if param.default is inspect.Parameter.empty and params.get(p) is None:
            raise errors.ConfigError(f'{field}.{p}: required by image source {name!r}')
    return name, params


class ArrayImages:
    """An in-memory float32 image array (N, H, W, C) behind the interface of `TfdsImages`."""

    labels = None

    def __init__(self, images: np.ndarray):
        self._images = images
        self.shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self._images)

    def take(self, ids: np.ndarray) -> np.ndarray:
        return self._images[ids].astype(np.float32)

    def read(self, ids: np.ndarray, labels: bool = False) -> tuple[np.ndarray, None]:
        del labels  # Its labels are an array beside it.
        return self.take(ids), None


class Subset:
    """Rows `rows` of a source on disk (e.g. a `TfdsImages`), renumbered 0..len - 1; its labels
    are an array beside it (`data.classes`)."""

    labels = None

    def __init__(self, source, rows: np.ndarray):
        self._source, self._rows = as_source(source), np.asarray(rows)
        self.shape = self._source.shape

    def __len__(self) -> int:
        return len(self._rows)

    def take(self, ids: np.ndarray) -> np.ndarray:
        return self._source.take(self._rows[ids])

    def read(self, ids: np.ndarray, labels: bool = False) -> tuple[np.ndarray, None]:
        del labels  # Its labels are an array beside it.
        return self.take(ids), None


def as_source(images: 'np.ndarray | TfdsImages | ArrayImages') -> 'TfdsImages | ArrayImages':
    """A dataset `load` returned, as an object with `len`, `shape` (H, W, C), `take` and `read`."""
    return ArrayImages(images) if isinstance(images, np.ndarray) else images


class ImageBatches:
    """This process's rows of global batch `step`, in the order of `stream.ShuffledStream`.

    `images` is an in-memory array or a source such as `TfdsImages`; `labels` None, an array,
    or the source's own `labels` (then read with the rows). Each example is flipped horizontally
    iff a coin drawn from (seed, step) for its global row says so, so batches do not depend on the
    device or process count. Safe to call from several threads.
    """

    def __init__(self, images, labels, batch_size: int, seed: int, *,
                 flip: bool = True, process_index: int | None = None, process_count: int | None = None):
        self._source = as_source(images)
        self._own_labels = labels is not None and labels is self._source.labels
        if labels is not None and not self._own_labels:
            labels = np.asarray(labels)
            if len(labels) != len(self._source):
                raise errors.UserError(f'{len(labels)} labels for {len(self._source)} images')
        self._labels = labels
        self._flip = flip
        self._stream = stream.ShuffledStream(len(self._source), batch_size, seed,
                                             process_index=process_index, process_count=process_count)
        self._lock = threading.Lock()  # The stream caches permutations.

    def local_ids(self, step: int) -> np.ndarray:
        """Dataset row ids of this process's rows of global batch `step`."""
        with self._lock:
            return self._stream.local_ids(step)

    def local_flips(self, step: int) -> np.ndarray:
        """Whether each of this process's rows of batch `step` is flipped (bool)."""
        s = self._stream
        if not self._flip:
            return np.zeros(s.batch_size // s.process_count, bool)
        return s.local_coins(step, _FLIP_SALT)

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """{'x1': float32 (B / P, H, W, C)[, 'label': int32 (B / P,)]}."""
        ids = self.local_ids(step)
        x1, labels = self._source.read(ids, self._own_labels)
        flips = self.local_flips(step)
        x1[flips] = x1[flips, :, ::-1]
        batch = {'x1': x1}
        if self._labels is not None:
            batch['label'] = labels if self._own_labels else self._labels[ids].astype(np.int32)
        return batch


class Prefetched:
    """`local_batch(step)` that reads the `depth` steps after the one asked for ahead, in grain threads.

    Steps asked for in order come from a grain iterator; any other step restarts it there, so a
    batch stays a function of its step alone (a resumed run needs no reader state).
    """

    def __init__(self, local_batch: Callable[[int], dict[str, np.ndarray]], depth: int = PREFETCH):
        self._local_batch = local_batch
        self._depth = depth
        self._iterator = None
        self._next = None

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        import grain  # Imported lazily: it takes seconds.

        step = int(step)
        if self._iterator is None or step != self._next:
            self.close()
            steps = grain.MapDataset.range(step, _LAST_STEP).map(self._local_batch)
            options = grain.ReadOptions(num_threads=self._depth, prefetch_buffer_size=self._depth)
            self._iterator = iter(steps.to_iter_dataset(options))
        try:
            batch = next(self._iterator)
        except BaseException:
            self.close()
            raise
        self._next = step + 1
        return batch

    def close(self) -> None:
        """Stops reading ahead."""
        if self._iterator is not None:
            close = getattr(self._iterator, 'close', None)
            if close is not None:
                close()
        self._iterator = self._next = None


def make_batches(images, labels, mesh: Mesh, batch_size: int, seed: int, *, flip: bool = True,
                 prefetch: int | None = None) -> Callable[[int], dict[str, jax.Array]]:
    """`batches(step) -> {'x1'[, 'label']}`: global arrays sharded along the mesh's 'data' axis.

    `prefetch` batches are read ahead in threads: by default none for an in-memory array and
    `PREFETCH` for a source on disk.
    """
    sharding.check_batch_size(batch_size, mesh, 'batch_size')
    reader = ImageBatches(images, labels, batch_size, seed, flip=flip)
    if prefetch is None:
        prefetch = 0 if isinstance(images, np.ndarray) else PREFETCH
    local_batch = Prefetched(reader.local_batch, prefetch) if prefetch > 0 else reader.local_batch
    return stream.global_batches(local_batch, mesh)
