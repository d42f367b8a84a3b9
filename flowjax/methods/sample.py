"""Method 'sample': `sample.count` samples of an export, written for external metric tools (docs/methods.md,
Sample job).

Any model kind (velocity, CAF, PeRFlow, ddpm) is sampled through its kind with the sampler `sample.sampler`;
a class-conditional one with the labels `sample.labels` ('uniform': drawn; a class id; a tuple of ids, cycled:
sample i gets labels[i mod len]) and classifier-free guidance `sample.guidance` (`kinds.guided`). Sample i
depends only on (sample.seed, i): its noise (N(0, I); toy points: `data.source`) and its uniform label are drawn
from fold_in(key, i) and its ODE is solved on its own (the coupling pass's per-example solver, so rk45's steps
are per sample), so the samples are the same for any batch size and on any number of devices or processes (bit
for bit while the rows per device stay the same, as for the coupling pass; otherwise to the last bits).

Layout of the workdir:
    samples.npz              images uint8 (N, H, W, C), the pixels (x + 1) * 127.5 rounded (NHWC, what FID
                             tools read: np.load(f)['images']); toy 2-D models: points float32 (N, 2) instead;
                             labels int32 (N,) for a class-conditional model
    samples.png              the first sample.grid samples (toy points: a scatter plot of all of them)
    parts/manifest.json      how the samples are made; `complete: true` once samples.npz is assembled
    parts/chunk-000000.npz   samples [k * B, min((k + 1) * B, N)) (B = sample.batch_size), with index and nfe

Process p of P samples the chunks k with k % P == p over its local devices and writes each atomically
(temporary name, then rename); chunks on disk are skipped, so a rerun resumes where a crash or a preemption
stopped (on SIGTERM or the first Ctrl-C each process stops after the chunk it is writing), a finished job is
skipped, and a workdir holding another job's samples is refused. Process 0 assembles samples.npz (atomically)
once every chunk exists.
"""

import dataclasses
import io
import json
import time
import uuid
import zipfile
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_dict

from flowjax import checkpoint, errors, generate, preemption, progress, sharding
from flowjax.data import pixels, toy2d
from flowjax.evaluation import images, report
from flowjax.evaluation import job as evaluation
from flowjax.flows import solvers
from flowjax.methods import method, training
from flowjax.models import kinds

FORMAT_VERSION = 1
UNIFORM = 'uniform'  # sample.labels: each sample's class drawn uniformly from (seed, i)
FILES = ('samples.npz', 'samples.png')
PARTS = 'parts'
MANIFEST = 'manifest.json'
_TMP = '.tmp-'  # a file being written is `<name>.tmp-<hex>` until renamed
# sample i's start and uniform label: fold_in(fold_in(key(seed), salt), i); flowjax.Model.sample draws alike
NOISE_SALT, LABEL_SALT = 0x5A3E, 0x1AB
# What the samples are made from: a rerun asking for other values is refused, never mixed in.
IDENTITY_FIELDS = ('version', 'checkpoint', 'step', 'kind', 'shape', 'output', 'source', 'sampler', 'rtol', 'atol',
                   't_eps', 'seed', 'count', 'batch_size', 'labels', 'num_classes', 'guidance')


def defaults() -> ml_collections.ConfigDict:
    """The `sample` section."""
    c = ml_collections.ConfigDict()
    c.checkpoint = config_dict.placeholder(str)  # an export (or its workdir), or a pipeline stage name
    c.count = 50_000  # samples written
    c.sampler = 'rk45'  # any sampler spec that applies to the model's kind (rk45 with eval.rtol / eval.atol)
    c.seed = 0  # sample i depends only on (seed, i)
    c.batch_size = 512  # samples a chunk (one jit call, one part file); a multiple of the local device count
    # class-conditional models: 'uniform', a class id, or a tuple of ids cycled (sample i: labels[i mod len])
    c.labels = config_dict.FieldReference(UNIFORM, field_type=object)
    c.guidance = 1.0  # classifier-free guidance scale (1: none; needs model.label_dropout > 0)
    c.grid = 64  # samples shown in samples.png (0: no figure)
    return c


@dataclasses.dataclass(frozen=True)
class Options:
    """The checked `config.sample`: the sampler parsed, labels 'uniform' or a tuple of class ids."""

    checkpoint: str
    count: int
    sampler: solvers.Sampler
    seed: int
    batch_size: int
    labels: str | tuple[int, ...]
    guidance: float
    grid: int


def _int(value: Any, field: str, low: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise errors.ConfigError(f'{field}={value!r}: expected an integer >= {low} ({what})')
    return value


def _labels(value: Any) -> str | tuple[int, ...]:
    """sample.labels checked: 'uniform', a class id >= 0 (as a 1-tuple), or a non-empty tuple of ids >= 0."""
    if value == UNIFORM:
        return UNIFORM
    ids = (value,) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) else None
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise errors.ConfigError(f"sample.labels={value!r}: expected {UNIFORM!r}, a class id >= 0 or a non-empty "
                                 'tuple of class ids >= 0 (cycled: sample i gets labels[i mod len])')
    return ids


def check(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Options:
    """Static checks of `config.sample` (one-line ConfigErrors); touches no files."""
    cfg = config.sample
    if not isinstance(cfg.checkpoint, str) or not cfg.checkpoint:
        raise errors.ConfigError('sample.checkpoint: an export directory (or pipeline stage name) is required')
    count = _int(cfg.count, 'sample.count', 1, 'samples written')
    if count >= 2 ** 31:
        raise errors.ConfigError(f'sample.count={count}: must be < 2**31')
    if not isinstance(cfg.sampler, str):
        raise errors.ConfigError(f"sample.sampler={cfg.sampler!r}: expected one sampler spec (e.g. 'euler@8', 'rk45')")
    sampler, = evaluation.parse_samplers(config, (cfg.sampler,), 'sample.sampler')
    seed = _int(cfg.seed, 'sample.seed', 0, 'the seed sample i is drawn from with i')
    if isinstance(cfg.batch_size, bool) or not isinstance(cfg.batch_size, int):
        raise errors.ConfigError(f'sample.batch_size={cfg.batch_size!r}: expected an integer')
    mesh = sharding.data_mesh(jax.local_devices() if devices is None else devices)
    sharding.check_batch_size(cfg.batch_size, mesh, 'sample.batch_size')
    guidance = kinds.check_guidance(cfg.guidance, 'sample.guidance')
    grid = _int(cfg.grid, 'sample.grid', 0, 'samples shown; 0: no figure')
    return Options(cfg.checkpoint, count, sampler, seed, cfg.batch_size, _labels(cfg.labels), guidance, grid)


# --------------------------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class Job:
    """What the chunks are made of: the model's (guided) kind and params, the noise, the labels, the manifest."""

    kind: kinds.Kind
    params: Any
    noise: generate.Draw  # key -> one start point
    manifest: dict
    name: str  # the model, for figure titles


def _model_name(path: epath.Path) -> str:
    """The export's workdir name (the export directory itself is called 'export')."""
    return path.parent.name if path.name == 'export' else path.name


def _output(shape: tuple[int, ...], path: epath.Path) -> str:
    """'images' for an (H, W, C) export, 'points' for a toy 2-D one; any other shape is refused."""
    if len(shape) == 3:
        return 'images'
    if shape == (2,):
        return 'points'
    raise errors.UserError(f'sample.checkpoint={path}: makes samples of shape {list(shape)}; expected (H, W, C) '
                           'images or toy 2-D points')


def prepare(config: ml_collections.ConfigDict, options: Options) -> Job:
    """Loads the export of sample.checkpoint and checks what depends on it: the sampler applies to its kind,
    the labels and the guidance to its classes; returns the job and its manifest."""
    path, _ = checkpoint.find_export(options.checkpoint)
    try:
        model = training.load_model(options.checkpoint, 'sample.checkpoint')
    except errors.UserError as e:
        raise errors.UserError(f'sample.checkpoint: {e}') from None
    meta, name = model.meta, _model_name(path)
    kind = kinds.guided(model.kind, options.guidance, 'sample.guidance', f'the model {name!r}')
    if not kind.supports(options.sampler):
        raise errors.UserError(f'sample.sampler={options.sampler.key!r}: does not apply to {path}, a model of kind '
                               f'{kind.name!r}')
    classes = kind.num_classes
    if options.labels != UNIFORM:
        given = options.labels[0] if len(options.labels) == 1 else options.labels
        if not classes:
            raise errors.UserError(f'sample.labels={given!r}: the model {name!r} is not class-conditional; class '
                                   'labels need a model trained with model.num_classes > 0')
        if max(options.labels) >= classes:
            raise errors.UserError(f'sample.labels={given!r}: class {max(options.labels)} is not a class of the '
                                   f'model {name!r} (num_classes={classes}: ids 0..{classes - 1})')
    shape = tuple(int(d) for d in meta['sample_shape'])
    output = _output(shape, path)
    if output == 'images':
        source, noise = None, (lambda key: jax.random.normal(key, shape))
    else:
        source = config.data.source.to_dict()
        draw = toy2d.source_sampler(config.data.source)
        noise = lambda key: draw(key, (1, *shape))[0]
    sampler = options.sampler
    manifest = {
        'version': FORMAT_VERSION, 'checkpoint': str(path), 'step': meta.get('step'), 'kind': kind.name,
        'shape': list(shape), 'output': output, 'source': source, 'sampler': sampler.key,
        'rtol': sampler.rtol if sampler.name == 'rk45' else None,
        'atol': sampler.atol if sampler.name == 'rk45' else None,
        't_eps': meta.get('flow', {}).get('t_eps', config.flow.t_eps), 'seed': options.seed, 'count': options.count,
        'batch_size': options.batch_size,
        'labels': None if not classes else options.labels if options.labels == UNIFORM else list(options.labels),
        'num_classes': classes, 'guidance': options.guidance, 'complete': False, 'mean_nfe': None,
    }
    return Job(kind, model.params, noise, manifest, name)


# --------------------------------------------------------------------------------------------- the parts


def chunk_path(parts: epath.Path, k: int) -> epath.Path:
    return parts / f'chunk-{k:06d}.npz'


def chunk_range(k: int, count: int, batch_size: int) -> tuple[int, int]:
    """The sample ids [lo, hi) chunk k holds."""
    return k * batch_size, min((k + 1) * batch_size, count)


def _write_atomic(target: epath.Path, data: bytes) -> None:
    tmp = target.parent / f'{target.name}{_TMP}{uuid.uuid4().hex}'
    tmp.write_bytes(data)
    tmp.replace(target)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def read_manifest(parts: epath.Path) -> dict | None:
    """The manifest of the parts directory, or None when there is none yet."""
    file = parts / MANIFEST
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise errors.UserError(f'{file}: unreadable sample manifest ({e})') from None


def _check_manifest(parts: epath.Path, stored: dict, requested: dict) -> None:
    """Refuses (one line) parts made with other identity fields than this run asks for."""
    for field in IDENTITY_FIELDS:
        want = json.loads(json.dumps(requested[field]))
        if stored.get(field) != want:
            raise errors.UserError(f'{parts}: holds samples made with {field}={stored.get(field)!r} but this run asks '
                                   f'for {field}={want!r}; use another workdir or delete {parts.parent}')


def present_chunks(parts: epath.Path, total: int) -> list[int]:
    """Ids k < total of the chunks that exist (one directory listing)."""
    if not parts.exists():
        return []
    names = {p.name for p in parts.iterdir()}
    return [k for k in range(total) if chunk_path(parts, k).name in names]


def _remove_partial_files(workdir: epath.Path) -> None:
    """Deletes the temporary files a killed writer left in the workdir and its parts (only while no process
    writes there); the chunks, the manifest and samples.npz themselves are always whole."""
    for directory in (workdir, workdir / PARTS):
        if directory.exists():
            for p in directory.iterdir():
                if _TMP in p.name and p.name.startswith(('chunk-', MANIFEST, *FILES)):
                    p.unlink()


def read_chunk(parts: epath.Path, k: int, manifest: dict) -> dict[str, np.ndarray]:
    """Chunk k's arrays, checked against the manifest (a damaged file is a one-line error naming it)."""
    file = chunk_path(parts, k)
    lo, hi = chunk_range(k, manifest['count'], manifest['batch_size'])
    try:
        with file.open('rb') as f, np.load(f) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise errors.UserError(f'{file}: unreadable sample chunk ({e}); delete it and rerun to write it again') from None
    if manifest['output'] not in arrays or not np.array_equal(arrays.get('index'), np.arange(lo, hi)):
        raise errors.UserError(f'{file}: not chunk {k} of this job (samples {lo}..{hi - 1}); delete it and rerun')
    return arrays


# --------------------------------------------------------------------------------------------- the pass


def _chunk_maker(job: Job, options: Options, mesh):
    """`k -> (pending device arrays)`: chunk k's starts and labels drawn on the devices holding their rows, and
    its per-example solves dispatched (fetched later by `np.asarray`)."""
    manifest = job.manifest
    solve = generate.pair_solver(job.kind, options.sampler, manifest['t_eps'], True, mesh)
    draw = generate.start_drawer(job.noise, mesh)
    rows = NamedSharding(mesh, P('data'))
    key = jax.random.key(options.seed)
    noise_key, label_key = jax.random.fold_in(key, NOISE_SALT), jax.random.fold_in(key, LABEL_SALT)
    uniform = generate.label_drawer(job.kind.num_classes, mesh)
    fixed = None if options.labels == UNIFORM else np.asarray(options.labels, np.int32)
    params = jax.device_put(job.params, NamedSharding(mesh, P()))

    def dispatch(k: int) -> tuple[int, jax.Array, jax.Array, jax.Array]:
        lo, hi = chunk_range(k, options.count, options.batch_size)
        ids = np.minimum(np.arange(lo, lo + options.batch_size), hi - 1).astype(np.int32)  # pad with the last one
        device_ids = jax.device_put(ids, rows)
        label = (uniform(label_key, device_ids) if fixed is None or not job.kind.num_classes
                 else jax.device_put(fixed[ids % len(fixed)], rows))
        x, nfe = solve(params, draw(noise_key, device_ids), label)
        return hi - lo, x, label, nfe

    return dispatch


def _chunk_arrays(job: Job, k: int, pending, options: Options) -> dict[str, np.ndarray]:
    """Chunk k's arrays on the host, from its dispatched solves; non-finite samples are a one-line error."""
    valid, x, label, nfe = pending
    x, label, nfe = (np.asarray(a)[:valid] for a in (x, label, nfe))
    bad = int(np.sum(~np.isfinite(x).reshape(len(x), -1).all(axis=1)))
    if bad:
        raise errors.UserError(f'sample: {bad} of {len(x)} samples of chunk {k} are not finite ({options.sampler.key} '
                               'gave non-finite values, e.g. rk45 hit max_steps); try another sample.sampler')
    lo, hi = chunk_range(k, options.count, options.batch_size)
    output = job.manifest['output']
    arrays = {output: pixels.to_uint8(x) if output == 'images' else x.astype(np.float32),
              'index': np.arange(lo, hi, dtype=np.int64), 'nfe': nfe.astype(np.int32)}
    if job.kind.num_classes:
        arrays['labels'] = label.astype(np.int32)
    return arrays


def _write_chunks(job: Job, options: Options, mesh, parts: epath.Path, todo: list[int], done: progress.Progress,
                  watch: preemption.Watch) -> list[int]:
    """Samples and writes the chunks `todo` in order, or the first of them until `watch` says stop; the next
    chunk is dispatched before the last one is fetched and written, so the host's work overlaps the devices'.
    Returns the chunks written."""
    dispatch = _chunk_maker(job, options, mesh)
    written = []
    pending = dispatch(todo[0]) if todo else None
    for n, k in enumerate(todo):
        ahead = dispatch(todo[n + 1]) if n + 1 < len(todo) else None
        arrays = _chunk_arrays(job, k, pending, options)
        _write_atomic(chunk_path(parts, k), _npz_bytes(arrays))
        written.append(k)
        done.update(len(arrays['index']))
        if watch.reached(n, n + 1):
            break
        pending = ahead
    return written


def _save_figure(path: epath.Path, samples: np.ndarray, output: str, title: str, name: str, panel: str) -> None:
    """samples.png, written atomically: a grid of the images, or a scatter plot of the points."""
    tmp = path.parent / f'{path.name}{_TMP}{uuid.uuid4().hex}'
    if output == 'images':
        images.save_grids(tmp, {name: {panel: samples}}, None, title=title)
    else:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5, 5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.scatter(samples[:, 0], samples[:, 1], s=2, c='C0', lw=0)
        ax.set_aspect('equal')
        ax.set_title(f'{name}: {panel}', fontsize=10)
        ax.tick_params(labelsize=7)
        report.save_figure(fig, tmp, title)
    tmp.replace(path)


def _assemble(workdir: epath.Path, parts: epath.Path, manifest: dict, total: int, options: Options,
              name: str) -> dict:
    """Process 0, every chunk present: samples.npz (and samples.png) written atomically, then the manifest
    marked complete with the mean NFE; returns the completed manifest."""
    chunks = [read_chunk(parts, k, manifest) for k in range(total)]
    output = manifest['output']
    arrays = {output: np.concatenate([c[output] for c in chunks])}
    if manifest['num_classes']:
        arrays['labels'] = np.concatenate([c['labels'] for c in chunks])
    nfe = np.concatenate([c['nfe'] for c in chunks])
    _write_atomic(workdir / FILES[0], _npz_bytes(arrays))
    if options.grid:
        shown = arrays[output] if output == 'points' else arrays[output][:options.grid]
        notes = [f'labels {options.labels}' if isinstance(options.labels, str) or len(options.labels) > 1
                 else f'class {options.labels[0]}'] if manifest['num_classes'] else []
        notes += [f'guidance {options.guidance:g}'] if options.guidance != 1 else []
        panel = f"{manifest['sampler']} (NFE {evaluation.mean_nfe(nfe.tolist())})"
        if notes:
            panel += '\n' + ', '.join(notes)
        _save_figure(workdir / FILES[1], shown, output, f"sample: {manifest['count']} samples", name, panel)
    complete = {**manifest, 'complete': True, 'mean_nfe': float(nfe.mean())}
    _write_atomic(parts / MANIFEST, json.dumps(complete, indent=2).encode())
    logging.info('sample: %s holds %d %s, mean NFE %.2f', workdir / FILES[0], manifest['count'], output,
                 complete['mean_nfe'])
    return complete


def _summary(manifest: dict, total: int, new: int, started: float) -> dict:
    return {'count': manifest['count'], 'output': manifest['output'], 'chunks': total, 'new_chunks': new,
            'complete': bool(manifest.get('complete')), 'mean_nfe': manifest.get('mean_nfe'),
            'seconds': time.monotonic() - started}


def sample(config: ml_collections.ConfigDict, workdir: str | epath.Path, *, devices: Sequence[jax.Device] | None = None,
           process_index: int | None = None, process_count: int | None = None) -> dict:
    """Writes this process's missing chunks of the job in `workdir`; process 0 assembles samples.npz once all
    exist. `devices` / `process_index` / `process_count` default to this process's; tests pass others."""
    started = time.monotonic()
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    devices = jax.local_devices() if devices is None else devices
    options = check(config, devices)
    mesh = sharding.data_mesh(devices)
    job = prepare(config, options)
    workdir = epath.Path(workdir)
    parts, final = workdir / PARTS, workdir / FILES[0]
    total = -(-options.count // options.batch_size)
    stored = read_manifest(parts)
    if stored is not None:
        _check_manifest(parts, stored, job.manifest)
        if stored.get('complete') and final.exists():
            logging.info('sample: %s already holds all %d samples; nothing to do', final, options.count)
            return _summary(stored, total, 0, started)
    elif final.exists():
        raise errors.UserError(f'{final}: exists but {parts / MANIFEST}, what made it, does not; use another workdir '
                               f'or remove {final}')
    elif pi == 0:
        parts.mkdir(parents=True, exist_ok=True)
        _write_atomic(parts / MANIFEST, json.dumps(job.manifest, indent=2).encode())
    if pi == 0:  # no process writes before the barrier below
        _remove_partial_files(workdir)
    sharding.barrier('flowjax-sample-manifest')
    stored = read_manifest(parts)
    if stored is None:
        raise errors.UserError(f'{parts / MANIFEST}: missing; process 0 writes it first')

    owned = [k for k in range(total) if k % pc == pi]
    present = set(present_chunks(parts, total))
    todo = [k for k in owned if k not in present]
    rows = {k: np.ptp(chunk_range(k, options.count, options.batch_size)) for k in owned}
    done = progress.Progress(f'sample {options.sampler.key}', sum(rows.values()),
                             done=sum(rows[k] for k in owned if k not in todo), unit='samples')
    logging.info('sample: %d of %d chunks of %d samples to write on process %d (%d on disk)', len(todo), total,
                 options.batch_size, pi, len(present))
    with preemption.Watch() as watch:
        written = _write_chunks(job, options, mesh, parts, todo, done, watch)
    sharding.barrier('flowjax-sample-chunks')
    preemption.stop_if_asked(watch, 'the sample job',
                             f'{len(present_chunks(parts, total))} of {total} chunks saved in {parts}')
    if pi == 0:
        if len(present_chunks(parts, total)) == total:
            _assemble(workdir, parts, stored, total, options, job.name)
        else:
            logging.info('sample: %d of %d chunks present in %s; rerun to finish', len(present_chunks(parts, total)),
                         total, parts)
    sharding.barrier('flowjax-sample-finish')
    return _summary(read_manifest(parts), total, len(written), started)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Method 'sample': sample.count samples of sample.checkpoint in `workdir` (see the module docstring)."""
    return sample(config, workdir)


# The sample job reads the flow's t_eps (when the export does not record it), eval.rtol / eval.atol (rk45) and
# data.source (toy points' noise); sample.checkpoint names an earlier stage.
METHOD = method.Method(name='sample', run=run, check=check, section=defaults, references=('sample.checkpoint',),
                       reads=('data', 'flow', 'eval'), lpips=lambda config: False)
