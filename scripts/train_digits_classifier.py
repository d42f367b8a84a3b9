"""Trains the fd_digits classifier and writes flowjax/metrics/digits_classifier.npz (deterministic).

The fixed stratified split of `digits_classifier.split()`; Adam with cosine decay; augmentation that
keeps digits digits: random shifts of up to 1 pixel (background fill), gaussian noise (--noise-std) and,
unless --no-flip, random horizontal flips, since flowjax's generators train on flipped digits by
default. Prints the test accuracy (unflipped test digits) and a sanity table of Frechet distances.
Usage: JAX_PLATFORMS=cpu python scripts/train_digits_classifier.py [--out PATH] [--steps N]
"""

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from flowjax.evaluation import frechet  # noqa: E402
from flowjax.metrics import digits_classifier as dc  # noqa: E402

BATCH = 128


def augment(key: jax.Array, images: jax.Array, flip: bool, noise_std: float) -> jax.Array:
    """Random 1-pixel shifts, noise and (if `flip`) horizontal flips of (B, 8, 8, 1) images."""
    shift_key, flip_key, noise_key = jax.random.split(key, 3)
    padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(shift_key, (len(images), 2), 0, 3)
    crop = lambda image, o: jax.lax.dynamic_slice(image, (o[0], o[1], 0), (8, 8, 1))  # noqa: E731
    images = jax.vmap(crop)(padded, offsets)
    if flip:
        flips = jax.random.bernoulli(flip_key, 0.5, (len(images), 1, 1, 1))
        images = jnp.where(flips, images[:, :, ::-1], images)
    return images + noise_std * jax.random.normal(noise_key, images.shape)


def train(x: np.ndarray, y: np.ndarray, steps: int, seed: int, flip: bool, noise_std: float) -> dict:
    """The trained variables."""
    module = dc.DigitsClassifier()
    init_key, data_key = jax.random.split(jax.random.key(seed))
    variables = module.init(init_key, jnp.zeros((1, 8, 8, 1)))
    optimizer = optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=1e-4)
    state = optimizer.init(variables)
    x, y = jnp.asarray(x), jnp.asarray(y)

    @jax.jit
    def step(variables, state, i):
        key = jax.random.fold_in(data_key, i)
        ids = jax.random.choice(jax.random.fold_in(key, 0), len(x), (BATCH,), replace=False)
        images = augment(jax.random.fold_in(key, 1), x[ids], flip, noise_std)

        def loss_fn(variables):
            logits = module.apply(variables, images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y[ids]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(variables)
        updates, state = optimizer.update(grads, state, variables)
        return optax.apply_updates(variables, updates), state, loss

    for i in range(steps):
        variables, state, loss = step(variables, state, i)
        if i % 500 == 0 or i == steps - 1:
            print(f'step {i:5d}  loss {float(loss):.4f}', flush=True)
    return variables


def accuracy(variables, x: np.ndarray, y: np.ndarray) -> float:
    logits = jax.jit(dc.DigitsClassifier().apply)(variables, jnp.asarray(x))
    return float(np.mean(np.argmax(np.asarray(logits), axis=-1) == y))


def box_blur(x: np.ndarray) -> np.ndarray:
    """3x3 box blur of (N, 8, 8, 1) images, background (-1) outside."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    return sum(padded[:, i:i + 8, j:j + 8] for i in range(3) for j in range(3)) / 9.0


def sanity_table(path: pathlib.Path) -> None:
    """fd_digits of the train split to the test split (the floor) and to degraded test digits."""
    module, variables = dc.load(path)
    embed = jax.jit(dc.feature_fn(module))

    def stats(images):
        return frechet.statistics(np.asarray(embed(variables, jnp.asarray(images, jnp.float32))))

    x_train, _, x_test, y_test = dc.split()
    rng = np.random.default_rng(0)
    half = (rng.random(len(x_test)) < 0.5)[:, None, None, None]
    rows = {
        'test split (the floor)': x_test,
        'test digits, half flipped': np.where(half, x_test[:, :, ::-1], x_test),
        'test digits, all flipped': x_test[:, :, ::-1],
        'test digits + noise std 0.1': x_test + 0.1 * rng.standard_normal(x_test.shape),
        'test digits + noise std 0.2': x_test + 0.2 * rng.standard_normal(x_test.shape),
        'test digits, 3x3 box blur': box_blur(x_test),
        f'test digits of class 0 only ({np.sum(y_test == 0)})': x_test[y_test == 0],
        'gaussian noise, clipped to [-1, 1]': np.clip(rng.standard_normal(x_test.shape), -1, 1),
    }
    reference = stats(x_train)
    print(f'fd_digits to the train split ({len(x_train)} digits) of {len(x_test)} images unless said:')
    for name, images in rows.items():
        print(f'  {name:42s} {frechet.frechet_distance(*stats(images), *reference):10.3f}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', type=pathlib.Path, default=dc.WEIGHTS)
    parser.add_argument('--steps', type=int, default=3000)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--no-flip', dest='flip', action='store_false')
    parser.add_argument('--noise-std', type=float, default=0.05)
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = dc.split()
    start = time.time()
    variables = train(x_train, y_train, args.steps, args.seed, args.flip, args.noise_std)
    test_accuracy = accuracy(variables, x_test, y_test)
    print(f'trained in {time.time() - start:.0f} s; test accuracy {test_accuracy:.4f} '
          f'(flipped test digits: {accuracy(variables, x_test[:, :, ::-1], y_test):.4f})')
    meta = {'accuracy': test_accuracy, 'test_size': dc.SPLIT_TEST_SIZE, 'split_seed': dc.SPLIT_SEED,
            'train_seed': args.seed, 'steps': args.steps, 'flip': args.flip,
            'noise_std': args.noise_std}
    np.savez_compressed(args.out, **dc.flatten(variables), **{f'meta/{k}': np.asarray(v) for k, v in meta.items()})
    print(f'wrote {args.out.name} ({args.out.stat().st_size / 1024:.0f} KiB)')
    sanity_table(args.out)


if __name__ == '__main__':
    main()
