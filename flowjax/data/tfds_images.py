"""tfds image datasets read at random from array_record files, without TensorFlow.

`load_tfds` opens a prepared dataset with `tfds.data_source`; `TfdsImages` decodes only the
rows a batch asks for (`take`), in a thread pool, so ImageNet-64 never sits in memory.
"""

import concurrent.futures
import contextlib
import functools
import io
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from flowjax import errors
from flowjax.data.pixels import from_uint8

# Threads decoding the rows of one read of a tfds dataset.
READ_THREADS = min(16, os.cpu_count() or 1)
_CHUNK = 16  # Rows per task of a read.
_BLOCK = 8192  # Rows whose raw records a read holds at once.
_MODES = {1: 'L', 3: 'RGB', 4: 'RGBA'}


@functools.cache
def _read_pool() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(READ_THREADS, thread_name_prefix='flowjax-images')


def _example_proto():
    """tfds' copy of the tf.train.Example message (no TensorFlow), or None where it moved."""
    try:
        from tensorflow_datasets.proto import tf_example_pb2
    except ImportError:
        return None
    return tf_example_pb2.Example


@functools.cache
def _cv2():
    """OpenCV where installed (it decodes PNG several times faster than Pillow), else None."""
    try:
        import cv2
    except ImportError:
        return None
    return cv2


def _decode_image(data: bytes, channels: int) -> np.ndarray:
    """PNG / JPEG bytes -> uint8 (H, W, channels)."""
    cv2 = _cv2()
    if cv2 is not None:
        array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if array is not None and array.dtype == np.uint8:
            array = array.reshape(array.shape[0], array.shape[1], -1)
            if array.shape[-1] == channels in (1, 3, 4):
                if channels == 1:
                    return array
                return cv2.cvtColor(array, cv2.COLOR_BGR2RGB if channels == 3 else cv2.COLOR_BGRA2RGBA)
    from PIL import Image  # Other modes, bit depths and channel counts; or no OpenCV.

    with Image.open(io.BytesIO(data)) as image:
        mode = _MODES.get(channels, 'RGB')
        if image.mode != mode:
            image = image.convert(mode)
        array = np.asarray(image, np.uint8)
    return array.reshape(array.shape[0], array.shape[1], -1)


class SourceLabels:
    """The int32 labels of a `TfdsImages`, which reads them with its rows.

    Array-like enough for checks: `len`, `size`, `max()` (num_classes - 1 of a ClassLabel
    feature, else the largest label, read once), and `labels[ids]`.
    """

    ndim = 1
    dtype = np.dtype(np.int32)

    def __init__(self, source: 'TfdsImages'):
        self.source = source
        self._max = None

    def __len__(self) -> int:
        return len(self.source)

    @property
    def size(self) -> int:
        return len(self.source)

    @property
    def shape(self) -> tuple[int]:
        return (len(self.source),)

    def max(self) -> int:
        if self._max is None:
            n = self.source.num_classes
            self._max = n - 1 if n is not None else int(self.source.read_labels(np.arange(len(self.source))).max())
        return self._max

    def __getitem__(self, ids) -> np.ndarray:
        if isinstance(ids, slice):
            ids = np.arange(*ids.indices(len(self.source)))
        return self.source.read_labels(ids)


class TfdsImages:
    """A prepared tfds image dataset, read at random from its files (array_record).

    `len(source)` images of `shape` (H, W, C); `take(ids)` decodes rows as float32 in [-1, 1],
    `read(ids, labels)` also returns their int32 labels (None unless `labels`). `labels` is None
    when the dataset has no label feature, else a `SourceLabels` view. A read decodes its rows
    in `READ_THREADS` threads. `records` is a tfds data source (`tfds.data_source(...)`).
    """

    def __init__(self, records: Sequence[Any], name: str, image_key: str = 'image', label_key: str | None = 'label'):
        import tensorflow_datasets as tfds

        features = records.dataset_info.features
        if image_key not in features:
            raise errors.UserError(f'tfds dataset {name!r} has no feature {image_key!r} '
                                   f"(it has {', '.join(features)}); set data.image.image_key")
        image = features[image_key]
        if len(image.shape) != 3 or np.dtype(image.np_dtype) != np.uint8:
            raise errors.UserError(f'tfds dataset {name!r}: {image_key!r} is {image!r}, expected uint8 images')
        self.name = name
        self._records = records
        self._features = features
        self._image_key = image_key
        self._label_key = label_key if label_key in features else None
        # Where tfds reads array_record files, read their records (bytes) in one batched call and
        # parse them here; other data sources (and tfds' mock data) give decoded examples.
        # (tfds keeps the array_record reader as `data_source`, an attribute it does not document:
        # setup.cfg bounds tensorflow-datasets; without it, reads are decoded by tfds, only slower.)
        from array_record.python import array_record_data_source

        raw = getattr(records, 'data_source', None)
        self._raw = raw if isinstance(raw, array_record_data_source.ArrayRecordDataSource) else records
        self._batched = isinstance(self._raw, array_record_data_source.ArrayRecordDataSource)
        self._proto = _example_proto() if isinstance(image, tfds.features.Image) else None
        label = features[self._label_key] if self._label_key else None
        self.num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else None
        self._channels = image.shape[-1]
        self.shape = tuple(image.shape)
        if None in self.shape:  # Sizes known per image only (e.g. downsampled_imagenet): the first's.
            self.shape = tuple(self._example(0)[0].shape)
        self.labels = SourceLabels(self) if self._label_key else None

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f'TfdsImages({self.name!r}, {len(self)} x {self.shape})'

    def _records_at(self, ids: np.ndarray) -> Sequence[Any]:
        if self._batched:  # array_record reads them in parallel (C++ threads).
            return self._raw.__getitems__([int(i) for i in ids])
        return [self._raw[int(i)] for i in ids]

    def _decode(self, raw: Any, pixels: bool = True) -> tuple[np.ndarray | None, int | None]:
        """(uint8 image (H, W, C) or None, label or None) of a record."""
        if isinstance(raw, bytes | memoryview):
            if self._proto is not None:  # The image's encoded bytes and the label, without tfds' decoding.
                feature = self._proto.FromString(raw).features.feature
                image = feature[self._image_key].bytes_list.value if self._image_key in feature else ()
                label = (feature[self._label_key].int64_list.value
                         if self._label_key is not None and self._label_key in feature else ())
                if len(image) == 1 and (self._label_key is None or len(label) == 1):
                    return (_decode_image(image[0], self._channels) if pixels else None,
                            int(label[0]) if self._label_key else None)
            raw = self._features.deserialize_example_np(raw)
        image = np.asarray(raw[self._image_key], np.uint8) if pixels else None
        return (image.reshape(*image.shape[:2], -1) if pixels else None,
                int(raw[self._label_key]) if self._label_key else None)

    def _example(self, i: int) -> tuple[np.ndarray, int | None]:
        return self._decode(self._records_at(np.array([i]))[0])

    def _read(self, ids: np.ndarray, pixels: bool, labels: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
        ids = np.asarray(ids, np.int64).reshape(-1)
        images = np.empty((len(ids), *self.shape), np.uint8) if pixels else None
        out = np.empty(len(ids), np.int32) if labels else None

        def fill(records: Sequence[Any], start: int, lo: int, hi: int) -> None:
            for k in range(lo, hi):
                image, label = self._decode(records[k - start], pixels)
                if pixels:
                    if image.shape != self.shape:
                        raise errors.UserError(f'tfds dataset {self.name!r}: image {int(ids[k])} has shape '
                                               f'{image.shape}, expected {self.shape} like image 0')
                    images[k] = image
                if labels:
                    out[k] = label

        for start in range(0, len(ids), _BLOCK):  # Raw records of a block at a time in memory.
            stop = min(start + _BLOCK, len(ids))
            records = self._records_at(ids[start:stop])
            if stop - start <= _CHUNK or READ_THREADS <= 1 or not pixels:
                fill(records, start, start, stop)
                continue
            tasks = [_read_pool().submit(fill, records, start, lo, min(lo + _CHUNK, stop))
                     for lo in range(start, stop, _CHUNK)]
            for task in tasks:
                task.result()
        return images, out

    def read_uint8(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` as stored: uint8 (len(ids), H, W, C)."""
        return self._read(ids, True, False)[0]

    def read_labels(self, ids: np.ndarray) -> np.ndarray:
        """int32 labels of rows `ids` (images are not decoded where the records allow)."""
        if self._label_key is None:
            raise errors.UserError(f'tfds dataset {self.name!r} has no labels')
        return self._read(ids, False, True)[1]

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows `ids` as float32 (len(ids), H, W, C) in [-1, 1]."""
        return from_uint8(self.read_uint8(ids))

    def read(self, ids: np.ndarray, labels: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(rows `ids` as float32 in [-1, 1], their int32 labels if `labels` else None)."""
        if labels and self._label_key is None:
            raise errors.UserError(f'tfds dataset {self.name!r} has no labels')
        images, out = self._read(ids, True, labels)
        return from_uint8(images), out


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f'{type(e).__name__}: {lines[0] if lines else ""}'


@contextlib.contextmanager
def _quiet_absl():
    """absl log records below ERROR dropped while the block runs."""
    logger = logging.getLogger('absl')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_tfds(dataset: str, split: str = 'train', data_dir: str | None = None, image_key: str = 'image',
              label_key: str | None = 'label') -> tuple[TfdsImages, SourceLabels | None]:
    """A tfds dataset already prepared in array_record format, e.g. 'cifar10' or
    'imagenet_resized/64x64' (`data_dir` None or '': tfds' default). Labels are None when the dataset
    has no `label_key` feature (e.g. downsampled_imagenet/64x64)."""
    import tensorflow_datasets as tfds

    data_dir = os.path.expanduser(data_dir) if data_dir else None  # '' is the default too.
    try:
        with _quiet_absl():  # tfds warns about every folder it probes; the error below says what is wrong
            records = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises many kinds; diagnose with the builder.
        try:
            with _quiet_absl():
                builder = tfds.builder(dataset, data_dir=data_dir)
                prepared = builder.is_prepared()
        except Exception as e2:
            raise errors.UserError(f'tfds dataset {dataset!r}: {_first_line(e2)}') from None
        root = builder.data_dir_root
        command = f'tfds build {dataset} --file_format=array_record --data_dir={root}'
        if 'imagenet' in dataset:  # Its archives need a login: downloaded by hand.
            command += ' --manual_dir=<folder of the downloaded archives>'
        if not prepared:
            where = '' if data_dir else " (tfds' default data_dir)"
            raise errors.UserError(
                f"tfds dataset {dataset!r} is not prepared in {root}{where}: prepare it with `{command}` "
                f"(needs pip install -e '.[tf]'; README: Image datasets), or set data.image.data_dir") from None
        formats = builder.info.available_file_formats()
        if 'array_record' not in {str(getattr(f, 'value', f)) for f in formats}:
            found = ', '.join(sorted(str(getattr(f, 'value', f)) for f in formats)) or 'unknown'
            raise errors.UserError(
                f"tfds dataset {dataset!r} in {builder.data_dir} is in {found} format, which tfds.data_source cannot "
                f"read at random: it needs file_format='array_record'; convert it with `tfds convert_format "
                f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record` (needs pip install -e "
                f"'.[tf]'; README: Image datasets)") from None
        raise errors.UserError(f'tfds dataset {dataset!r} in {root}: {_first_line(e)}') from None
    if isinstance(records, dict):  # A split of None gives every split.
        raise errors.UserError(f'tfds dataset {dataset!r}: set data.image.split (one of {", ".join(records)})')
    if not len(records):
        raise errors.UserError(f'tfds dataset {dataset!r}: split {split!r} is empty')
    source = TfdsImages(records, dataset, image_key, label_key)
    return source, source.labels
