"""flowjax from Python: `flowjax.load`, `flowjax.run` and `flowjax.config` (README, Python API).

    model = flowjax.load('runs/quick/teacher')        # an export, its workdir, or a .safetensors file
    x = model.sample(256, 'euler@8', seed=0)          # numpy: images (N, H, W, C) in [-1, 1], or (N, 2) points
    z = model.invert(x, 'euler@8')                    # the noise the samples came from
    report = flowjax.run('experiments/toy2d_rf.py:runlocal', 'runs/quick')

A model samples, inverts and reconstructs through its kind (`models.kinds`: velocity, caf, piecewise, ddpm) with
any sampler spec `flows.solvers.parse_sampler` reads, jitted once per (kind, operation, sampler) as evaluation
does (`evaluation.job.kind_function`), each batch sharded over this process's devices (rows padded to a multiple
of their count and dropped after). Bad input is the one-line `errors.UserError` the command line prints.
"""

import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from flowjax import checkpoint, errors, experiment, sharding
from flowjax.data.pixels import to_uint8
from flowjax.evaluation import job
from flowjax.flows import solvers
from flowjax.interop import safetensors_io
from flowjax.methods import sample as sample_job
from flowjax.models import kinds

__all__ = ['Model', 'load', 'run', 'config', 'to_uint8']

DEFAULT_SAMPLER = 'euler@8'
IMAGE_BATCH, POINT_BATCH = 256, 4096  # rows a jit call takes when batch_size is not given
_T_EPS = 1e-3  # flow.t_eps of an export whose meta records no flow


def _count(value: Any, field: str, low: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise errors.UserError(f'{field}={value!r}: expected an integer >= {low} ({what})')
    return int(value)


@functools.lru_cache(maxsize=16)
def _draw_fn(shape: tuple[int, ...], classes: int):
    """Jitted `(key, ids) -> (x0, labels)`: row i's N(0, I) start and uniform class from fold_in(key, i)."""

    def one(key, i):
        noise_key, label_key = (jax.random.fold_in(key, salt) for salt in (sample_job.NOISE_SALT, sample_job.LABEL_SALT))
        noise = jax.random.normal(jax.random.fold_in(noise_key, i), shape, jnp.float32)
        label = jax.random.randint(jax.random.fold_in(label_key, i), (), 0, max(classes, 1))
        return noise, label.astype(jnp.int32)

    return jax.jit(lambda key, ids: jax.vmap(lambda i: one(key, i))(ids))


@functools.lru_cache(maxsize=32)
def _velocity_fn(kind: kinds.Kind):
    """Jitted `(params, x, t, labels) -> v(x, t)` of a kind with a velocity of (x, t) alone."""
    return jax.jit(lambda params, x, t, label: kind.velocity(params, label)(x, t))


class Model:
    """A loaded model: `kind` (a `models.kinds` kind; `kind.name` is 'velocity', 'caf', 'piecewise' or 'ddpm'),
    `params` (numpy arrays, the export's tree), `meta` (the export's meta.json) and the `path` it was read from.

    Samples are numpy float32: images (N, H, W, C) in [-1, 1] (`flowjax.to_uint8` gives their pixels), toy models'
    points (N, 2). Sample i starts from N(0, I) noise drawn from (seed, i) alone (`noise`), so it is the same for
    any n and batch_size (rk45 chooses its steps for a whole batch: its samples depend on batch_size). A
    class-conditional model takes `labels`: a class id for every row, or one id per row; given none, `sample` draws
    them uniformly from (seed, i) (`draw_labels`). `guidance` is the classifier-free guidance scale (1: none; a
    class-conditional model trained with model.label_dropout > 0).
    """

    def __init__(self, kind: kinds.Kind, params: Any, meta: dict, path: str | None = None):
        self.kind, self.params, self.meta, self.path = kind, params, meta, path
        self.sample_shape = tuple(int(d) for d in meta['sample_shape'])
        self.eps = float(meta.get('flow', {}).get('t_eps', _T_EPS))
        self._mesh = sharding.data_mesh(jax.local_devices())
        self._placed = None

    def __repr__(self) -> str:
        classes = f', num_classes={self.num_classes}' if self.num_classes else ''
        return (f'Model(kind={self.kind.name!r}, sample_shape={self.sample_shape}{classes}, '
                f'params={job.parameter_count(self.params):,}, step={self.meta.get("step")})')

    @property
    def num_classes(self) -> int:
        """The classes the model is conditioned on (0: unconditional)."""
        return self.kind.num_classes

    @property
    def is_image(self) -> bool:
        """Whether its samples are images (H, W, C), else points."""
        return len(self.sample_shape) == 3

    # ------------------------------------------------------------------------------------------- checks

    def _name(self) -> str:
        return f'the model {self.path!r}' if self.path else 'the model'

    def _sampler(self, spec: str | solvers.Sampler, kind: kinds.Kind) -> solvers.Sampler:
        if isinstance(spec, solvers.Sampler):
            sampler = spec
        else:
            try:
                sampler = solvers.parse_sampler(spec)
            except ValueError as e:
                raise errors.UserError(str(e)) from None
        if not kind.supports(sampler):
            raise errors.UserError(f'sampler {sampler.key!r}: does not apply to {self._name()}, a model of kind '
                                   f'{kind.name!r}')
        return sampler

    def _guided(self, guidance: float) -> kinds.Kind:
        return kinds.guided(self.kind, guidance, 'guidance', self._name())

    def _rows(self, x: Any, field: str = 'x') -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.ndim != 1 + len(self.sample_shape) or tuple(x.shape[1:]) != self.sample_shape or not len(x):
            raise errors.UserError(f'{field}: shape {list(x.shape)} does not fit the model: expected (N, '
                                   f"{', '.join(map(str, self.sample_shape))}) with N >= 1")
        return x

    def _labels(self, labels: Any, n: int, required: bool) -> np.ndarray | None:
        """The (n,) int32 labels of a class-conditional model (None: to draw), None for an unconditional one."""
        classes = self.num_classes
        if not classes:
            if labels is not None:
                raise errors.UserError(f'labels: {self._name()} is not class-conditional; class labels need a model '
                                       'trained with model.num_classes > 0')
            return None
        if labels is None:
            if required:
                raise errors.UserError(f'labels: {self._name()} is class-conditional (num_classes={classes}); give '
                                       'the class of each row of x')
            return None
        ids = np.asarray(labels)
        if ids.ndim == 0:
            ids = np.full(n, ids)
        if (ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer) or (ids < 0).any()
                or (ids >= classes).any()):
            raise errors.UserError(f'labels: expected a class id or {n} class ids in 0..{classes - 1} '
                                   f'(num_classes={classes}), got {labels!r}'[:300])
        return ids.astype(np.int32)

    def _batch(self, batch_size: int | None) -> int:
        if batch_size is None:
            return IMAGE_BATCH if self.is_image else POINT_BATCH
        return _count(batch_size, 'batch_size', 1, 'rows a jit call takes')

    # ------------------------------------------------------------------------------------------- batches

    def _params(self) -> Any:
        if self._placed is None:
            self._placed = jax.device_put(self.params, sharding.replicated(self._mesh))
        return self._placed

    def _chunks(self, n: int, batch_size: int):
        """(first row, rows, padded ids) of each jit call: batch_size rows raised to a multiple of the devices."""
        devices = self._mesh.devices.size
        rows = -(-min(batch_size, n) // devices) * devices
        for lo in range(0, n, rows):
            valid = min(rows, n - lo)
            yield lo, valid, np.minimum(np.arange(lo, lo + rows), n - 1).astype(np.int32)

    def _put(self, rows: np.ndarray) -> jax.Array:
        return jax.device_put(rows, sharding.batch_sharded(self._mesh))

    def _over_rows(self, fn: Callable, arrays: list[np.ndarray | None], batch_size: int) -> np.ndarray:
        """`fn(params, *chunks)` (its first output) over the rows of `arrays` (None entries passed as None)."""
        n = len(arrays[0])
        out = []
        for _, valid, ids in self._chunks(n, batch_size):
            result = fn(self._params(), *(None if a is None else self._put(a[ids]) for a in arrays))
            out.append(np.asarray(result[0] if isinstance(result, tuple) else result)[:valid])
        return np.concatenate(out)

    def _drawn(self, n: int, seed: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        key = jax.random.key(_count(seed, 'seed', 0, 'sample i is drawn from (seed, i)'))
        draw = _draw_fn(self.sample_shape, self.num_classes)
        parts = [(np.asarray(x)[:valid], np.asarray(y)[:valid])
                 for _, valid, ids in self._chunks(n, batch_size) for x, y in [draw(key, self._put(ids))]]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    # ------------------------------------------------------------------------------------------- entry points

    def noise(self, n: int, seed: int = 0) -> np.ndarray:
        """The N(0, I) starts (n, *sample_shape) `sample(n, seed=seed)` integrates."""
        return self._drawn(_count(n, 'n', 1, 'a number of samples'), seed, self._batch(None))[0]

    def draw_labels(self, n: int, seed: int = 0) -> np.ndarray | None:
        """The uniform class ids `sample(n, seed=seed)` uses when given no labels (None: unconditional model)."""
        drawn = self._drawn(_count(n, 'n', 1, 'a number of samples'), seed, self._batch(None))[1]
        return drawn if self.num_classes else None

    def sample(self, n: int, sampler: str | solvers.Sampler = DEFAULT_SAMPLER, *, seed: int = 0, labels: Any = None,
               guidance: float = 1.0, batch_size: int | None = None) -> np.ndarray:
        """n samples, noise -> data with `sampler` (e.g. 'euler@8', 'heun@4:edm', 'caf@4', 'rk45')."""
        n = _count(n, 'n', 1, 'a number of samples')
        kind = self._guided(guidance)
        sampler = self._sampler(sampler, kind)
        given = self._labels(labels, n, required=False)
        batch = self._batch(batch_size)
        x0, drawn = self._drawn(n, seed, batch)
        label = (given if given is not None else drawn) if self.num_classes else None
        return self._over_rows(job.kind_function(kind, 'sample', sampler, self.eps), [x0, label], batch)

    def sample_from(self, x0: Any, sampler: str | solvers.Sampler = DEFAULT_SAMPLER, *, labels: Any = None,
                    guidance: float = 1.0, batch_size: int | None = None) -> np.ndarray:
        """Samples from given starts x0 (n, *sample_shape): noise -> data with `sampler`."""
        return self._solve('sample', x0, sampler, labels, guidance, batch_size, 'x0')

    def invert(self, x: Any, sampler: str | solvers.Sampler = DEFAULT_SAMPLER, *, labels: Any = None,
               guidance: float = 1.0, batch_size: int | None = None) -> np.ndarray:
        """The noise data x (n, *sample_shape) comes from: data -> noise with `sampler`."""
        return self._solve('invert', x, sampler, labels, guidance, batch_size, 'x')

    def reconstruct(self, x: Any, sampler: str | solvers.Sampler = DEFAULT_SAMPLER, *, labels: Any = None,
                    guidance: float = 1.0, batch_size: int | None = None) -> np.ndarray:
        """x inverted to noise and sampled back with `sampler` (a CAF model keeps the data's initial velocity)."""
        return self._solve('reconstruct', x, sampler, labels, guidance, batch_size, 'x')

    def _solve(self, operation: str, x: Any, sampler: Any, labels: Any, guidance: float, batch_size: int | None,
               field: str) -> np.ndarray:
        x = self._rows(x, field)
        kind = self._guided(guidance)
        sampler = self._sampler(sampler, kind)
        label = self._labels(labels, len(x), required=True)
        return self._over_rows(job.kind_function(kind, operation, sampler, self.eps), [x, label],
                               self._batch(batch_size))

    def velocity(self, x: Any, t: Any, labels: Any = None, *, guidance: float = 1.0,
                 batch_size: int | None = None) -> np.ndarray:
        """v(x, t) of a velocity or ddpm model (its probability-flow velocity): x (n, *sample_shape), t a time
        in [0, 1] (0: noise, 1: data) or one per row."""
        kind = self._guided(guidance)
        if not hasattr(kind, 'velocity'):
            raise errors.UserError(f'velocity: {self._name()} is of kind {kind.name!r}, which has no velocity of '
                                   '(x, t) alone (kinds velocity and ddpm have one)')
        x = self._rows(x)
        try:
            t = np.broadcast_to(np.asarray(t, np.float32), (len(x),))
        except (TypeError, ValueError):
            t = None
        if t is None or not np.isfinite(t).all():
            raise errors.UserError(f't: expected a finite time or {len(x)} of them (one per row of x)')
        label = self._labels(labels, len(x), required=True)
        return self._over_rows(_velocity_fn(kind), [x, np.ascontiguousarray(t), label], self._batch(batch_size))

    def save_safetensors(self, path: str | os.PathLike) -> str:
        """Writes the params and meta to the .safetensors file `path` (docs/methods.md, Safetensors layout);
        `flowjax.load(path)` reads it back. Returns the path."""
        return str(safetensors_io.save(path, self.params, self.meta, self._name()))


def _stages_with_exports(path: epath.Path) -> list[str]:
    """The subdirectories of a pipeline workdir that hold an export, for the error naming them."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.is_dir() and checkpoint.find_export(p)[1])


def load(path: str | os.PathLike) -> Model:
    """The model of an export directory, a workdir holding one (a training stage's), or a .safetensors file."""
    path = str(path)
    if os.path.isfile(path) or path.endswith('.safetensors'):
        params, meta = safetensors_io.load(path)
        where = os.path.abspath(path)
    else:
        export, found = checkpoint.find_export(path)
        stages = [] if found else _stages_with_exports(epath.Path(export))
        if stages:
            raise errors.UserError(f"{export}: no exported model here, but in its subdirectories {', '.join(stages)} "
                                   f'(a pipeline\'s stages): load one, e.g. {os.path.join(path, stages[-1])}')
        params, meta = checkpoint.load_export(path)
        where = str(export)
    kind = safetensors_io.kind_of(meta, where)
    if 'sample_shape' not in meta:
        raise errors.UserError(f'{where}: the meta has no sample_shape (expected a list of sizes, e.g. [32, 32, 3])')
    return Model(kind, params, meta, where)


def config(spec: str) -> ml_collections.ConfigDict:
    """The config of an experiment file 'path.py[:arg]', as `--config=` loads it: locked (fields can be changed,
    a misspelt one is an error), to edit before `run`."""
    return experiment.load_config(spec)


def run(config: str | ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict | None:
    """Runs an experiment (a file spec 'path.py[:arg]' or a config) in `workdir` as `python -m flowjax.main` does:
    the same checks, resume and outputs. Returns the workdir's report (report.json) when the run writes one."""
    config = experiment.load_config(config) if isinstance(config, str) else config
    method, workdir = experiment.prepare(config, os.fspath(workdir) if workdir else workdir)
    experiment.run(config, workdir, method)
    report = epath.Path(workdir) / 'report.json'
    return json.loads(report.read_text()) if report.exists() else None
