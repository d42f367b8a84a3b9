"""The small CNN behind `fd_digits`: a classifier of scikit-learn's 8x8 digits whose penultimate
features stand in for Inception's in a Frechet distance (no download: the weights ship as
`digits_classifier.npz` next to this file, made by `scripts/train_digits_classifier.py`).

Trained on a fixed stratified split with random 1-pixel shifts, small noise and random horizontal
flips (flowjax's image models train on flipped digits by default), so it recognises flipped digits.
"""

import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flowjax import errors

WEIGHTS = pathlib.Path(__file__).with_name('digits_classifier.npz')
FEATURES = 128
NUM_CLASSES = 10
SPLIT_TEST_SIZE = 0.25  # sklearn train_test_split(test_size, random_state, stratify=labels)
SPLIT_SEED = 0
META_KEYS = ('accuracy', 'test_size', 'split_seed', 'train_seed', 'steps', 'flip', 'noise_std')


class DigitsClassifier(nn.Module):
    """(B, 8, 8, 1) images in [-1, 1] -> (B, 10) logits, or (B, 128) ReLU features if `features`."""
    precision: Any = jax.lax.Precision.HIGHEST  # the same features on CPU and GPU (no TF32)

    @nn.compact
    def __call__(self, images: jax.Array, features: bool = False) -> jax.Array:
        conv = lambda width, name: nn.Conv(width, (3, 3), precision=self.precision, name=name)  # noqa: E731
        h = nn.relu(conv(32, 'conv1')(images.astype(jnp.float32)))
        h = nn.relu(conv(32, 'conv2')(h))
        h = nn.avg_pool(h, (2, 2), (2, 2))  # 8x8 -> 4x4
        h = nn.relu(conv(64, 'conv3')(h))
        h = jnp.mean(h, axis=(1, 2))
        h = nn.relu(nn.Dense(FEATURES, precision=self.precision, name='features')(h))
        if features:
            return h
        return nn.Dense(NUM_CLASSES, precision=self.precision, name='logits')(h)


def split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) of the fixed stratified digits split."""
    from sklearn.model_selection import train_test_split

    from flowjax.data import images

    x, y = images.digits()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=SPLIT_TEST_SIZE,
                                                        random_state=SPLIT_SEED, stratify=y)
    return x_train, y_train, x_test, y_test


def _flat(tree: Any) -> dict[str, Any]:
    return {'/'.join(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def flatten(variables: Any) -> dict[str, np.ndarray]:
    """{'params/conv1/kernel': float32 array, ...}: the variables under '/'-joined keys."""
    return {key: np.asarray(leaf, np.float32) for key, leaf in _flat(variables).items()}


def _unflatten(arrays: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for key, value in arrays.items():
        *parents, name = key.split('/')
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = jnp.asarray(value)
    return tree


def _read(path: pathlib.Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise errors.UserError(f'{path}: the fd_digits classifier weights are missing (reinstall flowjax '
                               f'or run scripts/train_digits_classifier.py)')
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except Exception as e:  # Not a zip, truncated, pickled members.
        raise errors.UserError(f"{path}: unreadable classifier weights ({type(e).__name__}: "
                               f"{' '.join(str(e).split())})") from None


def info(path: pathlib.Path = WEIGHTS) -> dict[str, Any]:
    """The weights' metadata: test `accuracy` (on the split's test digits), `test_size` and `split_seed`
    of the split, and the training's `train_seed`, `steps`, `flip` and `noise_std`."""
    arrays = _read(path)
    missing = [k for k in META_KEYS if f'meta/{k}' not in arrays]
    if missing:
        raise errors.UserError(f'{path}: corrupt classifier weights (no {", ".join(missing)})')
    return {k: arrays[f'meta/{k}'].item() for k in META_KEYS}


def load(path: pathlib.Path = WEIGHTS) -> tuple[DigitsClassifier, dict]:
    """(module, variables) of the shipped classifier."""
    module = DigitsClassifier()
    arrays = {k: v for k, v in _read(path).items() if not k.startswith('meta/')}
    expected = _flat(jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
    wrong = sorted(set(expected) ^ set(arrays)) or [k for k in expected if arrays[k].shape != expected[k].shape]
    if wrong:
        raise errors.UserError(f'{path}: corrupt classifier weights (missing, unexpected or misshapen: '
                               f'{", ".join(wrong)})')
    return module, _unflatten(arrays)


def feature_fn(module: DigitsClassifier) -> Callable[[Any, jax.Array], jax.Array]:
    """The pure `features(variables, images) -> (B, 128)`, for the caller to jit or shard."""

    def features(variables, images):
        return module.apply(variables, images, features=True)

    return features
