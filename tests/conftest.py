"""Tests run on 8 fake CPU devices.

The experiments' end-to-end tests compile the same small U-Nets again and again (in this
process and in `python -m flowjax.main` subprocesses): one persistent XLA compilation cache,
fresh for each test session, serves them all.
"""

import atexit
import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ['JAX_PLATFORMS'] = 'cpu'
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='flowjax-tests-xla-cache-')
    os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.3'
    atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

import pathlib  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def experiment_config(name: str, arg: str | None = None):
    """get_config of an experiment file (unlocked)."""
    from flowjax import configs

    return configs.experiment(ROOT / 'experiments' / f'{name}.py', name, arg)


def stand_in_teacher(config, path, stage: str = 'teacher') -> str:
    """Exports pipeline `config`'s `stage` network at random weights to `path` (`random_export`) and makes
    that export the stage's `checkpoint`; returns the path. Experiments' tests stand it in for a trained
    teacher whose training other tests run."""
    random_export(config[stage], path)
    config[stage].checkpoint = str(path)
    return str(path)


def random_export(teacher, path) -> str:
    """Exports the network of the training config `teacher` at small random weights (without compiling its
    init) to `path`, as its training would; returns the path."""
    import jax
    import numpy as np

    from flowjax import checkpoint, train
    from flowjax.data import datasets
    from flowjax.models import kinds

    kind, shape = kinds.from_config(teacher), datasets.sample_shape(teacher)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: (0.05 * rng.standard_normal(leaf.shape)).astype(leaf.dtype),
                          jax.eval_shape(lambda key: kind.init(key, shape), jax.random.key(0)))
    checkpoint.export(path, params, train.export_meta(teacher, kind, shape, 0))
    return str(path)


@pytest.fixture
def load_experiment():
    """get_config of an experiment file, locked as main would load it."""

    def load(name: str, arg: str | None = None):
        config = experiment_config(name, arg)
        config.lock()
        return config

    return load
