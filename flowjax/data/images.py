"""In-memory image datasets for flows: x1 images NHWC float32 in [-1, 1] (t = 1 is data).

A config names a source by `name` and sets its parameters, e.g. `{'name': 'digits'}`,
`{'name': 'npz', 'path': 'gs://bucket/cifar.npz'}` or `{'name': 'folder', 'path': ..., 'size': 64}`.
Batches are stateless in the step and reuse the coupling reader's shuffled-stream indexing.
"""

import inspect
from collections.abc import Callable

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import Mesh

from flowjax import errors, sharding
from flowjax.data import stream

Dataset = tuple[np.ndarray, np.ndarray | None]
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')
_FLIP_SALT = 0xF11B
_GRAY_MODES = ('1', 'L', 'LA')


def _from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


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
    return _from_uint8(images), labels


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
    return _from_uint8(np.stack(out)), None


SOURCES: dict[str, Callable[..., Dataset]] = {
    'digits': digits,
    'npz': load_npz,
    'folder': load_folder,
}


def load(spec: ml_collections.ConfigDict, field: str = 'data.image') -> Dataset:
    """(images, labels or None) from the source a config spec names; `field` names it in errors."""
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
    return SOURCES[name](**params)


class ImageBatches:
    """This process's rows of global batch `step`, in the order of `stream.ShuffledStream`.

    Each example is flipped horizontally iff a coin drawn from (seed, step) for its global row
    says so, so batches do not depend on the device or process count.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray | None, batch_size: int, seed: int, *,
                 flip: bool = True, process_index: int | None = None, process_count: int | None = None):
        if labels is not None and len(labels) != len(images):
            raise errors.UserError(f'{len(labels)} labels for {len(images)} images')
        self._images = images
        self._labels = labels
        self._flip = flip
        self._stream = stream.ShuffledStream(len(images), batch_size, seed,
                                             process_index=process_index, process_count=process_count)
        self.local_ids = self._stream.local_ids

    def local_flips(self, step: int) -> np.ndarray:
        """Whether each of this process's rows of batch `step` is flipped (bool)."""
        s = self._stream
        if not self._flip:
            return np.zeros(s.batch_size // s.process_count, bool)
        coins = np.random.default_rng([s.seed, _FLIP_SALT, step]).random(s.batch_size) < 0.5
        return coins[s.local_rows]

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """{'x1': float32 (B / P, H, W, C)[, 'label': int32 (B / P,)]}."""
        ids = self.local_ids(step)
        x1 = self._images[ids].astype(np.float32)
        flips = self.local_flips(step)
        x1[flips] = x1[flips, :, ::-1]
        batch = {'x1': x1}
        if self._labels is not None:
            batch['label'] = self._labels[ids].astype(np.int32)
        return batch


def make_batches(images: np.ndarray, labels: np.ndarray | None, mesh: Mesh, batch_size: int, seed: int, *,
                 flip: bool = True) -> Callable[[int], dict[str, jax.Array]]:
    """`batches(step) -> {'x1'[, 'label']}`: global arrays sharded along the mesh's 'data' axis."""
    sharding.check_batch_size(batch_size, mesh, 'batch_size')
    return stream.global_batches(ImageBatches(images, labels, batch_size, seed, flip=flip).local_batch, mesh)
