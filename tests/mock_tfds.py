"""Small tfds image datasets for tests, written as real array_record files without TensorFlow.

    with mock_tfds.mock_cifar10(num_examples=64) as data_dir:
        ...  # config.data.image = {'name': 'tfds', 'dataset': 'cifar10', 'split': 'train'} now reads them

`write_fake_dataset` prepares any registered tfds image dataset (cifar10, imagenet_resized/64x64,
downsampled_imagenet/64x64, ...) in `data_dir`, with the features of the real builder: random
images (PNG, encoded by Pillow), random class labels, random text. `tfds.data_source` and
`flowjax.data.images.load` then read it as they would the real dataset.
"""

import contextlib
import json
import tempfile
from collections.abc import Iterator

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core.utils import file_utils


def _fake_value(feature, rng: np.random.Generator, index: int, image_size: int):
    if isinstance(feature, tfds.features.Image):
        h, w, c = (d if d is not None else image_size for d in feature.shape)
        pixels = rng.integers(0, 256, (h, w, c), np.uint8)
        return PIL.Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    if isinstance(feature, tfds.features.ClassLabel):
        return int(rng.integers(feature.num_classes))
    if isinstance(feature, tfds.features.Text):
        return f'example_{index}'
    if isinstance(feature, tfds.features.Tensor) and feature.shape == ():
        return np.zeros((), feature.np_dtype)
    raise NotImplementedError(f'no fake value for the feature {feature!r}')


def write_fake_dataset(data_dir: str | epath.Path, name: str = 'cifar10', *, num_examples: int = 64,
                       splits: tuple[str, ...] = ('train', 'test'), image_size: int = 64, seed: int = 0,
                       file_format: str = 'array_record') -> epath.Path:
    """Prepares `name` (e.g. 'imagenet_resized/64x64') in `data_dir` with fake examples.

    Images of unknown size (e.g. downsampled_imagenet's) are image_size x image_size. Returns the
    dataset's version folder. `file_format='tfrecord'` writes no records (tfrecord needs
    TensorFlow) but the metadata of a tfrecord dataset, which is all a random-access reader sees.
    """
    real = tfds.builder(name, data_dir=data_dir)
    features = real.info.features
    config = real.builder_config

    class Fake(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = real.version
        BUILDER_CONFIGS = [config] if config is not None else []

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            del dl_manager
            return {split: self._generate_examples(k) for k, split in enumerate(splits)}

        def _generate_examples(self, salt):
            rng = np.random.default_rng([seed, salt])
            for i in range(num_examples):
                yield i, {key: _fake_value(f, rng, i, image_size) for key, f in features.items()}

    Fake.name = real.name
    builder = Fake(data_dir=data_dir, config=config.name if config else None, file_format='array_record')
    builder.download_and_prepare()
    if file_format != 'array_record':  # Rewrite the metadata only: a reader that needs records fails anyway.
        info = epath.Path(builder.data_dir) / 'dataset_info.json'
        meta = json.loads(info.read_text())
        meta['fileFormat'] = file_format
        info.write_text(json.dumps(meta))
        for file in epath.Path(builder.data_dir).glob('*.array_record-*'):
            file.rename(str(file).replace('.array_record-', f'.{file_format}-'))
    return epath.Path(builder.data_dir)


@contextlib.contextmanager
def registered_data_dir(data_dir: str | epath.Path) -> Iterator[None]:
    """Makes tfds look for datasets in `data_dir` too when no data_dir is given (reading only)."""
    path = epath.Path(data_dir)
    added = path not in file_utils._REGISTERED_DATA_DIRS  # pylint: disable=protected-access
    file_utils.add_data_dir(path)
    try:
        yield
    finally:
        if added:
            file_utils._REGISTERED_DATA_DIRS.discard(path)  # pylint: disable=protected-access


@contextlib.contextmanager
def mock_cifar10(num_examples: int = 64, seed: int = 0) -> Iterator[str]:
    """A fake CIFAR-10 (train and test splits of `num_examples` random 32x32 images, labels 0..9).

    It lies in a temporary data_dir, which it yields and registers with tfds meanwhile, so a config
    with `data.image.data_dir` unset (tfds' default) reads it too, unless a real CIFAR-10 is
    prepared in the default data_dir.
    """
    with tempfile.TemporaryDirectory(prefix='mock_tfds_') as data_dir:
        write_fake_dataset(data_dir, 'cifar10', num_examples=num_examples, seed=seed)
        with registered_data_dir(data_dir):
            yield data_dir
