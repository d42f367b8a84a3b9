"""Method `generate`: a teacher's couplings, written as a sharded, resumable store in the workdir.

Pair i depends only on (seed, i): its start point is drawn from `fold_in(key, i)` (forward image
pairs: read on the host from dataset row `perm_e[i mod N]`, see `data_rows`) and its ODE is
solved on its own (vmap over single examples, so rk45's steps and NFE are per pair), so the store
is the same on any number of devices or processes, bit for bit while the rows per device
(batch_size / local devices, at most a shard) stay the same: XLA picks kernels by that shape (CPU
convolutions, GPU kernels, on some CPUs an MLP's matmuls), and with them the last bits (which can
flip rk45 step decisions) (docs/methods.md, Couplings). Process p writes the
shards k with k % process_count == p over its local devices, with no cross-process collectives;
shards already on disk are skipped, so a preempted pass resumes where it stopped. On SIGTERM (or
the first Ctrl-C) each process stops after the shard it is writing and the pass raises
`errors.Preempted`. The host keeps two shards queued on its devices: drawing the next start points,
copying finished pairs to the host and writing shards (in a background thread) overlap the solve.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import config_dict

from flowjax import checkpoint, errors, preemption, sharding, writers
from flowjax.data import couplings, datasets, toy2d
from flowjax.flows import solvers
from flowjax.methods import method
from flowjax.models import kinds


def defaults() -> ml_collections.ConfigDict:
    """`config.generate`: a teacher's couplings, written as shards + manifest in the workdir."""
    c = ml_collections.ConfigDict()
    c.teacher = config_dict.placeholder(str)  # export dir, or a pipeline stage name
    c.num_pairs = 10_000
    c.batch_size = 1_000  # pairs solved at once (split over the local devices)
    c.shard_size = 1_000  # pairs a shard file; pair i lives in shard i // shard_size
    c.sampler = 'rk45'  # or 'euler@N', 'heun@N', 'midpoint@N'
    c.rtol = 1e-5
    c.atol = 1e-5
    c.direction = 'backward'  # backward: noise -> data; forward: real data -> noise
    c.dtype = 'float32'  # storage: float32, bfloat16 or float16
    c.model_dtype = config_dict.placeholder(str)  # the teacher's compute dtype; None: as trained
    # Classifier-free guidance scale of a class-conditional teacher trained with model.label_dropout > 0
    # (docs/methods.md, Guidance); 1: none. Each pair's label (drawn, or its image's) is the condition.
    c.guidance = 1.0
    c.max_new_shards = config_dict.placeholder(int)  # stop after writing this many
    return c


MODEL_DTYPES = ('float32', 'bfloat16')  # generate.model_dtype: the teacher's activations in the solve
DIRECTIONS = ('backward', 'forward')  # backward: noise -> teacher data; forward: real data -> noise
_STREAMS = {'backward': 0x6E01, 'forward': 0xDA7A}  # start points: noise, or real data
Draw = Callable[[jax.Array], jax.Array]  # key -> one example
# (pair ids, with labels) -> their real x1 float32 (n, *shape) and int32 labels (n,) or None, on the host
Read = Callable[[np.ndarray, bool], tuple[np.ndarray, np.ndarray | None]]


@dataclasses.dataclass(frozen=True)
class Endpoints:
    """Where a data kind's pairs start: on-device samplers of `noise` (x0) and real `data` (x1),
    or real x1 read on the host (`read`, for data held by a host reader such as images)."""
    shape: tuple[int, ...]
    noise: Draw
    data: Draw | None  # None: real data is read on the host (`read`), or not needed (backward)
    spec: dict  # the data fields the pairs depend on, recorded in the manifest
    read: Read | None = None  # forward pairs of host-read data


def _toy2d_endpoints(config: ml_collections.ConfigDict, direction: str) -> Endpoints:
    source = toy2d.source_sampler(config.data.source)
    target = toy2d.distribution(config.data.target, 'data.target')
    used = {'source': config.data.source} if direction == 'backward' else {'target': config.data.target}
    return Endpoints(shape=(2,), noise=lambda key: source(key, (1, 2))[0], data=lambda key: target(key, 1)[0],
                     spec={'kind': 'toy2d', **{k: v.to_dict() for k, v in used.items()}})


def _image_endpoints(config: ml_collections.ConfigDict, direction: str) -> Endpoints:
    """Backward: N(0, I) noise of the images' shape. Forward: pair i's x1 is dataset row
    `data_rows(seed, i, N)`, unflipped (`data.flip` is not applied), with its true label; the
    manifest's `data` records the image source and N (docs/methods.md, Couplings)."""
    shape = datasets.sample_shape(config)
    noise = lambda key: jax.random.normal(key, shape)
    spec = {'kind': 'image', 'shape': list(shape)}
    if direction == 'backward':
        return Endpoints(shape=shape, noise=noise, data=None, spec=spec)
    count = datasets.num_images(config)

    def read(ids: np.ndarray, labels: bool) -> tuple[np.ndarray, np.ndarray | None]:
        return datasets.read_rows(config, data_rows(config.seed, ids, count), labels)

    return Endpoints(shape=shape, noise=noise, data=None, read=read,
                     spec={**spec, 'image': datasets.image_spec(config), 'num_images': count})


@functools.lru_cache(maxsize=2)
def _data_permutation(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, _STREAMS['forward'], epoch]).permutation(count)


def data_rows(seed: int, ids: np.ndarray, count: int) -> np.ndarray:
    """The dataset row of each forward pair id i: `perm_e[i mod N]` with e = i // N and perm_e a
    permutation of the N rows drawn from (seed, epoch e), so the first N pairs use every image once,
    the next N again in a fresh order (docs/methods.md, Couplings)."""
    epochs, positions = np.divmod(np.asarray(ids, np.int64), count)
    rows = np.empty_like(positions)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        rows[mask] = _data_permutation(seed, int(epoch), count)[positions[mask]]
    return rows


# data.kind -> endpoints.
DATA_KINDS: dict[str, Callable[[ml_collections.ConfigDict, str], Endpoints]] = {
    'toy2d': _toy2d_endpoints,
    'image': _image_endpoints,
}


@dataclasses.dataclass(frozen=True)
class Job:
    """A validated generate config: the teacher, the sampler and the requested manifest."""
    kind: kinds.Kind  # the teacher's model kind (hashable, keys the compiled solver)
    params: Any
    sampler: solvers.Sampler
    endpoints: Endpoints
    manifest: dict
    classes: int  # > 0: class-conditional; pair i's label is uniform from (seed, i), or its real image's (forward)


def _teacher_path(teacher: str) -> str:
    path = teacher if '://' in teacher else os.path.abspath(teacher)
    if epath.Path(path).name != 'export' and checkpoint.export_dir(path).exists():
        path = str(checkpoint.export_dir(path))
    return path


def check(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> tuple[solvers.Sampler, Endpoints]:
    """Static checks of `config.generate` (one-line ConfigErrors); touches no files."""
    cfg = config.generate
    mesh = sharding.data_mesh(jax.local_devices()) if mesh is None else mesh
    for field in ('num_pairs', 'shard_size'):
        if isinstance(cfg[field], bool) or not isinstance(cfg[field], int) or cfg[field] < 1:
            raise errors.ConfigError(f'generate.{field}={cfg[field]!r}: must be an integer >= 1')
    if cfg.num_pairs >= 2 ** 31:
        raise errors.ConfigError(f'generate.num_pairs={cfg.num_pairs}: must be < 2**31')
    sharding.check_batch_size(cfg.batch_size, mesh, 'generate.batch_size')
    if cfg.max_new_shards is not None and cfg.max_new_shards < 0:
        raise errors.ConfigError(f'generate.max_new_shards={cfg.max_new_shards}: must be >= 0 (or unset)')
    if cfg.direction not in DIRECTIONS:
        raise errors.ConfigError(f"generate.direction={cfg.direction!r}: expected one of {', '.join(DIRECTIONS)}")
    if cfg.model_dtype not in (None, *MODEL_DTYPES):
        raise errors.ConfigError(f"generate.model_dtype={cfg.model_dtype!r}: expected one of {', '.join(MODEL_DTYPES)} "
                                 "(or unset: the teacher's own)")
    if cfg.dtype not in couplings.DTYPES:
        raise errors.ConfigError(f"generate.dtype={cfg.dtype!r}: expected one of {', '.join(couplings.DTYPES)}")
    kinds.check_guidance(cfg.guidance, 'generate.guidance')
    try:
        sampler = solvers.parse_sampler(cfg.sampler, rtol=cfg.rtol, atol=cfg.atol)
    except ValueError as e:
        raise errors.ConfigError(f'generate.sampler: {e}') from None
    if config.data.kind not in DATA_KINDS:
        raise errors.ConfigError(f"data.kind={config.data.kind!r}: generate supports {', '.join(DATA_KINDS)}")
    endpoints = DATA_KINDS[config.data.kind](config, cfg.direction)
    if not cfg.teacher:
        raise errors.ConfigError('generate.teacher: an export directory (or pipeline stage name) is required')
    return sampler, endpoints


def prepare(config: ml_collections.ConfigDict, mesh: Mesh) -> Job:
    """Checks `config.generate` and loads the teacher."""
    cfg = config.generate
    sampler, endpoints = check(config, mesh)
    teacher = _teacher_path(cfg.teacher)
    try:
        params, meta = checkpoint.load_export(teacher)
        kinds.from_meta(meta, 'generate.teacher').module  # noqa: B018 - a bad model config fails here, not in jit
    except Exception as e:  # missing export, unreadable weights, unknown model
        raise errors.ConfigError(f"generate.teacher: cannot load {teacher} ({' '.join(str(e).split())})") from None
    if tuple(meta['sample_shape']) != endpoints.shape:
        raise errors.ConfigError(f'generate.teacher: {teacher} makes samples of shape {meta["sample_shape"]}, '
                                 f'data.kind={config.data.kind!r} has shape {list(endpoints.shape)}')
    if cfg.model_dtype is not None:
        if 'dtype' not in meta['model']:
            raise errors.ConfigError(f"generate.model_dtype={cfg.model_dtype!r}: the teacher's model "
                                     f"({meta['model'].get('name')}) has no dtype setting")
        meta['model'] = {**meta['model'], 'dtype': cfg.model_dtype}
    t_eps = meta.get('flow', {}).get('t_eps', config.flow.t_eps)
    kind = kinds.guided(kinds.from_meta(meta, 'generate.teacher'), cfg.guidance, 'generate.guidance',
                        f'the teacher {teacher}')
    if not kind.supports(sampler):
        raise errors.ConfigError(f'generate.sampler={cfg.sampler!r}: does not apply to the teacher {teacher}, a model '
                                 f'of kind {kind.name!r}')
    classes = kind.num_classes
    if classes and endpoints.read is not None:
        _check_labels(config, classes)
    manifest = {
        'version': couplings.FORMAT_VERSION, 'teacher': teacher, 'teacher_step': meta.get('step'),
        'data': endpoints.spec, 'sampler': sampler.key,
        'rtol': sampler.rtol if sampler.name == 'rk45' else None,
        'atol': sampler.atol if sampler.name == 'rk45' else None,
        'direction': cfg.direction, 'seed': config.seed, 'num_pairs': cfg.num_pairs,
        'shard_size': cfg.shard_size, 'dtype': cfg.dtype, 'shape': list(endpoints.shape), 't_eps': t_eps,
        'model_dtype': cfg.model_dtype, 'num_classes': classes, 'complete': False, 'mean_nfe': None,
    }
    if cfg.guidance != 1:  # recorded only when used: stores written before guidance keep their manifests
        manifest['guidance'] = float(cfg.guidance)
    return Job(kind, params, sampler, endpoints, manifest, classes)


def _check_labels(config: ml_collections.ConfigDict, classes: int) -> None:
    """Forward image pairs of a class-conditional teacher take their images' labels: refused in one
    line when the images have none, or labels the teacher does not know."""
    labels = datasets.load_images(config)[1]
    spec = datasets.image_spec(config)
    if labels is None:
        raise errors.UserError(f'generate.teacher: a class-conditional teacher (num_classes={classes}) needs '
                               f'labelled images for forward pairs; data.image ({spec}) has no labels')
    if labels.size and labels.max() >= classes:
        raise errors.UserError(f'generate.teacher: the teacher has num_classes={classes}, data.image ({spec}) '
                               f'has label {int(labels.max())}')


@functools.lru_cache(maxsize=16)
def pair_solver(kind: kinds.Kind, sampler: solvers.Sampler, eps: float, backward: bool, mesh: Mesh):
    """Jitted `(params, x, label) -> (x_end, nfe)`: each device solves its rows one pair at a time
    (vmap), sampling noise -> data (`backward`) or inverting data -> noise through the kind;
    `label` is used only by a class-conditional model."""
    run = kind.sample if backward else kind.invert

    def local(params, x, label):
        def one(x_i, label_i):
            y, nfe = run(params, x_i[None], sampler, eps=eps, label=label_i[None] if kind.num_classes else None)
            return y[0], nfe

        return jax.vmap(one)(x, label)

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P('data'), P('data')),
                                 out_specs=(P('data'), P('data')), check_vma=False))


def start_drawer(draw: Draw, mesh: Mesh):
    """Jitted `(key, ids) -> x`: example i drawn from fold_in(key, i), on the device holding row i."""
    local = lambda key, ids: jax.vmap(lambda i: draw(jax.random.fold_in(key, i)))(ids)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P('data')), out_specs=P('data')))


def label_drawer(classes: int, mesh: Mesh):
    """Jitted `(key, ids) -> labels`: pair i's class drawn uniformly from fold_in(key, i) (0 if none)."""
    draw = (lambda key: jax.random.randint(key, (), 0, classes)) if classes else (lambda key: jnp.int32(0))
    return start_drawer(draw, mesh)


def _start_points(job: Job, direction: str, mesh: Mesh) -> Callable[[np.ndarray], tuple[jax.Array, jax.Array]]:
    """`ids -> (x_start, label)` on the devices, rows sharded along 'data': drawn there from
    (seed, i), or (forward pairs of host-read data) read on the host and put on the devices."""
    row_sharding = NamedSharding(mesh, P('data'))
    if direction == 'forward' and job.endpoints.read is not None:
        def read(ids: np.ndarray) -> tuple[jax.Array, jax.Array]:
            x, label = job.endpoints.read(ids, bool(job.classes))
            label = label if job.classes else np.zeros(len(ids), np.int32)
            return jax.device_put(x, row_sharding), jax.device_put(label.astype(np.int32), row_sharding)

        return read
    key = start_key(job.manifest['seed'], direction)
    draw = start_drawer(job.endpoints.noise if direction == 'backward' else job.endpoints.data, mesh)
    draw_label, label_key = label_drawer(job.classes, mesh), jax.random.fold_in(key, 0x1AB)

    def on_device(ids: np.ndarray) -> tuple[jax.Array, jax.Array]:
        ids = jax.device_put(ids, row_sharding)
        return draw(key, ids), draw_label(label_key, ids)

    return on_device


def start_key(seed: int, direction: str) -> jax.Array:
    """Pair i's start point (noise for backward, real data for forward) is drawn from fold_in(key, i)."""
    return jax.random.fold_in(jax.random.key(seed), _STREAMS[direction])


def generate_couplings(config: ml_collections.ConfigDict, workdir: str | epath.Path, *,
                       devices: Sequence[jax.Device] | None = None, process_index: int | None = None,
                       process_count: int | None = None) -> dict:
    """Writes this process's missing shards of the store in `workdir`; process 0 completes it.

    `devices` / `process_index` / `process_count` default to this process's; tests pass others.
    """
    started = time.monotonic()
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    mesh = sharding.data_mesh(jax.local_devices() if devices is None else devices)
    job = prepare(config, mesh)
    cfg, out = config.generate, epath.Path(workdir)
    total = couplings.num_shards(cfg.num_pairs, cfg.shard_size)
    stored = couplings.read_manifest(out)
    if stored is not None:
        couplings.check_manifest(out, stored, job.manifest)
        if stored.get('complete'):
            logging.info('generate: %s already holds all %d pairs; nothing to do', out, cfg.num_pairs)
            return _summary(stored, total, 0, started)
    elif pi == 0:
        out.mkdir(parents=True, exist_ok=True)
        couplings.write_manifest(out, job.manifest)
    if pi == 0:  # no process writes before the barrier below
        couplings.remove_partial_files(out)
    sharding.barrier('flowjax-generate-manifest')
    stored = couplings.read_manifest(out)
    if stored is None:
        raise errors.UserError(f'{out}: {couplings.MANIFEST} missing; process 0 writes it first')
    couplings.check_manifest(out, stored, job.manifest)

    owned = [k for k in range(total) if k % pc == pi]
    present = set(couplings.present_shards(out, total))
    missing = [k for k in owned if k not in present]
    todo = missing if cfg.max_new_shards is None else missing[:cfg.max_new_shards]
    progress = writers.Progress(len(owned), len(owned) - len(missing))
    timing = {'prepared': time.monotonic() - started}
    with preemption.Watch() as watch:
        nfe_sums = _write_shards(job, cfg, mesh, out, todo, len(owned) - len(missing), progress, watch, timing)

    sharding.barrier('flowjax-generate-shards')
    if pi == 0:
        _finish(out, stored, total, nfe_sums)
    sharding.barrier('flowjax-generate-finish')
    preemption.stop_if_asked(watch, 'the coupling pass',
                             f'{len(couplings.present_shards(out, total))} of {total} shards saved in {out}')
    if pi == 0 and config.data.kind == 'image' and todo:
        _save_pair_grid(out, couplings.read_manifest(out))
    return {**_summary(couplings.read_manifest(out), total, len(todo), started), 'timing': timing}


def _save_pair_grid(out: epath.Path, manifest: dict, count: int = 32) -> None:
    """`couplings.png`: the first pairs of shard 0, noise x0 beside x1 (the teacher's, or real for
    forward pairs)."""
    from flowjax.evaluation import images

    if 0 not in couplings.present_shards(out, 1):
        return
    pairs = couplings.read_shard(out, 0, manifest, names=('x0', 'x1'))
    x0 = np.clip(np.asarray(pairs['x0'][:count], np.float32) / 3.0, -1, 1)  # noise shown at std 1/3
    x1 = {'backward': 'x1 (teacher)', 'forward': 'x1 (real)'}[manifest['direction']]
    images.save_grids(out / 'couplings.png', {'pairs': {'x0 (noise / 3)': x0, x1: pairs['x1'][:count]}},
                      None, title=f"couplings: {manifest['sampler']}")


_IN_FLIGHT = 2  # shards dispatched to the devices while the host fetches and writes an earlier one


def _write_shards(job: Job, cfg: ml_collections.ConfigDict, mesh: Mesh, out: epath.Path, todo: list[int],
                  done: int, progress: writers.Progress, watch: preemption.Watch,
                  timing: dict[str, float] | None = None) -> dict[int, tuple[int, int]]:
    """Solves and writes the shards `todo`, or the first of them until `watch` says stop; returns
    {k: (nfe sum, pairs)} and records in `timing` the seconds from the loop's start to the first
    shard's pairs on the host ('first_shard') and to the last shard written ('loop'). The host keeps `_IN_FLIGHT` shards queued on the devices, and fetches,
    checks and (in a background thread) writes shard k while shard k + 1 is solved: the start points
    of the next shard are drawn, and the last one's pairs copied and written, while the devices work."""
    backward = cfg.direction == 'backward'
    eps = job.manifest['t_eps']
    solve = pair_solver(job.kind, job.sampler, eps, backward, mesh)
    starts = _start_points(job, cfg.direction, mesh)
    params = jax.device_put(job.params, NamedSharding(mesh, P()))
    rows = min(cfg.batch_size, -(-cfg.shard_size // mesh.size) * mesh.size)

    def dispatch(k: int) -> list:
        lo, hi = couplings.shard_range(k, cfg.num_pairs, cfg.shard_size)
        pending = []
        for start in range(lo, hi, rows):
            ids = np.minimum(np.arange(start, start + rows), hi - 1).astype(np.int32)  # pad with the last pair
            x_start, label = starts(ids)
            pending.append((hi - start, x_start, label, *solve(params, x_start, label)))
        return pending

    timing = {} if timing is None else timing
    begun = time.monotonic()
    nfe_sums = {}
    queued: collections.deque[list] = collections.deque()
    writing: concurrent.futures.Future | None = None
    last = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='flowjax-shard-writer') as writer:
        for n, k in enumerate(todo):
            while len(queued) < _IN_FLIGHT and n + len(queued) < len(todo):
                queued.append(dispatch(todo[n + len(queued)]))
            fetched = [[np.asarray(a)[:valid] for a in arrays] for valid, *arrays in queued.popleft()]
            x_start, label, x_end, nfe = (np.concatenate(parts) for parts in zip(*fetched))
            timing.setdefault('first_shard', time.monotonic() - begun)
            bad = int(np.sum(~np.isfinite(x_end).reshape(len(x_end), -1).all(axis=1)))
            if bad:
                raise errors.UserError(
                    f'generate: {bad} of {len(x_end)} pairs of shard {k} did not converge ({job.sampler.key} gave '
                    'non-finite values, e.g. rk45 hit max_steps); loosen generate.rtol/atol or use euler@N')
            lo, hi = couplings.shard_range(k, cfg.num_pairs, cfg.shard_size)
            x0, x1 = (x_start, x_end) if backward else (x_end, x_start)
            arrays = {'x0': x0, 'x1': x1, 'index': np.arange(lo, hi, dtype=np.int64), 'nfe': nfe.astype(np.int32)}
            if job.classes:
                arrays['label'] = label.astype(np.int32)
            if writing is not None:
                writing.result()  # one shard written at a time, in order; a failed write is raised here
                if watch.reached(n - 1, n):  # a stop asked for while shard n - 1 was written: not shard n
                    writing = None
                    break
            writing = writer.submit(couplings.write_shard, out, k, arrays, cfg.dtype)
            nfe_sums[k] = (int(nfe.sum()), len(nfe))
            seconds, last = max(time.monotonic() - last, 1e-9), time.monotonic()
            progress(done + n + 1, {'shard': k, 'pairs/s': len(nfe) / seconds, 'nfe/s': nfe.sum() / seconds,
                                    'mean_nfe': nfe.mean()})
        if writing is not None:
            writing.result()
            watch.reached(len(todo) - 1, len(todo))
    timing['loop'] = time.monotonic() - begun
    return nfe_sums


def _finish(out: epath.Path, manifest: dict, total: int, nfe_sums: dict[int, tuple[int, int]]) -> None:
    """Marks the store complete with its mean NFE once every shard exists (process 0)."""
    present = couplings.present_shards(out, total)
    if len(present) < total:
        logging.info('generate: %d of %d shards present in %s; rerun to finish', len(present), total, out)
        return
    for k in present:
        if k not in nfe_sums:
            nfe = couplings.read_shard(out, k, manifest, names=('nfe',))['nfe']
            nfe_sums[k] = (int(nfe.sum()), len(nfe))
    nfe_total = sum(s for s, _ in nfe_sums.values())
    pairs = sum(n for _, n in nfe_sums.values())
    couplings.write_manifest(out, {**manifest, 'complete': True, 'mean_nfe': nfe_total / pairs})
    logging.info('generate: %s complete, %d pairs, mean NFE %.2f', out, pairs, nfe_total / pairs)


def _summary(manifest: dict, total: int, new_shards: int, started: float) -> dict:
    return {'num_pairs': manifest['num_pairs'], 'mean_nfe': manifest.get('mean_nfe'), 'shards': total,
            'new_shards': new_shards, 'complete': bool(manifest.get('complete')),
            'seconds': time.monotonic() - started}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Method `generate`: the teacher's couplings in `workdir` (see module docstring)."""
    return generate_couplings(config, workdir)


# The coupling pass reads the data (its noise and shape) and the flow's t_eps; not the model,
# training or evaluation sections.
METHOD = method.Method(name='generate', run=run, check=check, section=defaults,
                       references=('generate.teacher',), reads=('data', 'flow'))
