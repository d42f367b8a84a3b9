"""The coupling store: teacher pairs (x0 noise, x1 data) written in shards, read back shuffled.

Layout of a store directory (local or bucket, through `etils.epath`):
    manifest.json        how the pairs were made; `complete: true` once every shard exists
    shard-000000.npz     pairs [k * S, min((k + 1) * S, N)): x0, x1, index (int64), nfe (int32)[, label]

A shard appears under its final name only when fully written (temporary name, then rename),
so "the file exists" means "the shard is complete". bfloat16 / float16 pairs are stored as
uint16 views; the manifest's `dtype` says how to read them back.
"""

import io
import json
import uuid
from collections.abc import Callable
from typing import Any

import jax
import ml_dtypes
import numpy as np
from etils import epath
from jax.sharding import Mesh

from flowjax import errors, sharding
from flowjax.data import stream

FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
DTYPES: dict[str, Any] = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}
# What a store was made from; a rerun asking for other values is refused, never mixed in.
IDENTITY_FIELDS = ('version', 'teacher', 'teacher_step', 'data', 'sampler', 'rtol', 'atol', 'direction', 'seed',
                   'num_pairs', 'shard_size', 'dtype', 'shape', 't_eps', 'model_dtype')
_PAIR_FIELDS = ('x0', 'x1')
_PAIR_FLIP_SALT = 0xF11C
_MIX_SHUFFLE_SALT = 0x313C  # the second store of a mix: permutations of its own


def num_shards(num_pairs: int, shard_size: int) -> int:
    return -(-num_pairs // shard_size)


def shard_range(k: int, num_pairs: int, shard_size: int) -> tuple[int, int]:
    """The global pair ids [lo, hi) shard k holds."""
    return k * shard_size, min((k + 1) * shard_size, num_pairs)


def shard_path(path: str | epath.Path, k: int) -> epath.Path:
    return epath.Path(path) / f'shard-{k:06d}.npz'


_TMP = '.tmp-'  # a file being written is `<name>.tmp-<hex>` until renamed; readers never list it


def _write_atomic(target: epath.Path, data: bytes) -> None:
    tmp = target.parent / f'{target.name}{_TMP}{uuid.uuid4().hex}'
    tmp.write_bytes(data)
    tmp.replace(target)


def remove_partial_files(path: str | epath.Path) -> None:
    """Deletes the temporary files a killed writer left in the store at `path` (call it only while
    no process writes there); the shards and the manifest themselves are always whole."""
    path = epath.Path(path)
    if path.exists():
        for p in path.iterdir():
            if _TMP in p.name and (p.name.startswith('shard-') or p.name.startswith(MANIFEST)):
                p.unlink()


def _jsonable(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


def read_manifest(path: str | epath.Path) -> dict | None:
    """The manifest of the store at `path`, or None when there is none yet."""
    file = epath.Path(path) / MANIFEST
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError as e:
        raise errors.UserError(f'{file}: unreadable coupling manifest ({e})') from None


def write_manifest(path: str | epath.Path, manifest: dict) -> None:
    _write_atomic(epath.Path(path) / MANIFEST, json.dumps(manifest, indent=2).encode())


def check_manifest(path: str | epath.Path, stored: dict, requested: dict,
                   fields: tuple[str, ...] = IDENTITY_FIELDS) -> None:
    """Refuses (one line) a store whose `fields` differ from what this run asks for."""
    for field in fields:
        if field in requested and stored.get(field) != _jsonable(requested[field]):
            raise errors.UserError(
                f'{path}: coupling store was made with {field}={stored.get(field)!r} but this run asks for '
                f'{field}={_jsonable(requested[field])!r}; use another workdir or delete the store')


def present_shards(path: str | epath.Path, count: int) -> list[int]:
    """Ids k < count of the shards that exist (one directory listing, cheap on buckets)."""
    path = epath.Path(path)
    if not path.exists():
        return []
    names = {p.name for p in path.iterdir()}
    return [k for k in range(count) if shard_path(path, k).name in names]


def write_shard(path: str | epath.Path, k: int, arrays: dict[str, np.ndarray], dtype: str) -> None:
    """Writes shard k atomically; x0 / x1 are cast to `dtype` (16-bit kinds as uint16 views)."""
    out = {}
    for name, value in arrays.items():
        if name in _PAIR_FIELDS:
            value = np.asarray(value).astype(DTYPES[dtype])
            out[name] = value if dtype == 'float32' else value.view(np.uint16)
        else:
            out[name] = np.asarray(value)
    buffer = io.BytesIO()
    np.savez(buffer, **out)
    _write_atomic(shard_path(path, k), buffer.getvalue())


def read_shard(path: str | epath.Path, k: int, manifest: dict, names: tuple[str, ...] | None = None) -> dict:
    """Shard k's arrays (x0 / x1 in the storage dtype), checked; one-line error naming a bad file."""
    file = shard_path(path, k)
    lo, hi = shard_range(k, manifest['num_pairs'], manifest['shard_size'])
    try:
        with file.open('rb') as f, np.load(f, allow_pickle=False) as npz:
            names = names or tuple(npz.files)
            arrays = {name: npz[name] for name in names}
    except Exception as e:  # truncated zip, bad header, missing member: all mean the same to the user
        raise errors.UserError(f'{file}: truncated or corrupted coupling shard ({type(e).__name__}: '
                               f"{' '.join(str(e).split())}); delete it and rerun the generate stage") from None
    expect = {'x0': (hi - lo, *manifest['shape']), 'x1': (hi - lo, *manifest['shape']),
              'index': (hi - lo,), 'nfe': (hi - lo,)}
    for name, shape in expect.items():
        if name in arrays and arrays[name].shape != shape:
            raise errors.UserError(f'{file}: corrupted coupling shard ({name} has shape '
                                   f'{arrays[name].shape}, expected {shape}); delete it and rerun the generate stage')
    if 'index' in arrays and not np.array_equal(arrays['index'], np.arange(lo, hi)):
        raise errors.UserError(f'{file}: corrupted coupling shard (index is not {lo}..{hi - 1}); '
                               'delete it and rerun the generate stage')
    dtype = manifest['dtype']
    for name in _PAIR_FIELDS:
        if name in arrays and dtype != 'float32':
            arrays[name] = arrays[name].view(DTYPES[dtype])
    return arrays


class Store:
    """A complete, validated coupling store. `load()` reads every shard into host memory
    (fine for toy and CIFAR-sized stores; a streaming reader can replace it later)."""

    def __init__(self, path: epath.Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._arrays: dict[str, np.ndarray] | None = None

    @property
    def num_pairs(self) -> int:
        return self.manifest['num_pairs']

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.manifest['shape'])

    def load(self) -> dict[str, np.ndarray]:
        """All pairs in index order: x0, x1 (storage dtype), index, nfe[, label]; cached."""
        if self._arrays is None:
            n = num_shards(self.num_pairs, self.manifest['shard_size'])
            shards = [read_shard(self.path, k, self.manifest) for k in range(n)]
            self._arrays = {name: np.concatenate([s[name] for s in shards]) for name in shards[0]}
        return self._arrays

    def head(self, count: int) -> dict[str, np.ndarray]:
        """The first `count` pairs, as `load` gives them, reading only the shards that hold them."""
        if self._arrays is not None:
            return {name: value[:count] for name, value in self._arrays.items()}
        shards = [read_shard(self.path, k, self.manifest)
                  for k in range(max(1, num_shards(min(count, self.num_pairs), self.manifest['shard_size'])))]
        return {name: np.concatenate([s[name] for s in shards])[:count] for name in shards[0]}


def open_store(path: str | epath.Path, expect: dict | None = None) -> Store:
    """The store at `path`, refused with a one-line error unless complete and matching `expect`."""
    path = epath.Path(path)
    if not path.exists():
        raise errors.UserError(f'{path}: no coupling store here (the directory does not exist)')
    manifest = read_manifest(path)
    if manifest is None:
        raise errors.UserError(f'{path}: no coupling store here ({MANIFEST} is missing; run the generate stage)')
    if manifest.get('version') != FORMAT_VERSION:
        raise errors.UserError(f'{path}: coupling store format {manifest.get("version")!r} is not the '
                               f'supported {FORMAT_VERSION}; regenerate it')
    total = num_shards(manifest['num_pairs'], manifest['shard_size'])
    present = len(present_shards(path, total))
    if not manifest.get('complete') or present < total:
        raise errors.UserError(f'{path}: incomplete coupling store: {present} of {total} shards present, '
                               'rerun the generate stage')
    for field, value in (expect or {}).items():
        if manifest.get(field) != _jsonable(value):
            raise errors.UserError(f'{path}: coupling store has {field}={manifest.get(field)!r}, '
                                   f'expected {field}={_jsonable(value)!r}')
    return Store(path, manifest)


class CouplingBatches:
    """Stateless shuffled batches of stored pairs, in the order of `stream.ShuffledStream`.

    `flip`: each image pair is flipped horizontally, x0 and x1 together, iff a coin drawn from
    (seed, step) for its global row says so (SlimFlow's paired flip). `per_step`: fields whose
    value is a function of the step (e.g. an annealing coefficient), given to every example.
    """

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, seed: int, *, flip: bool = False,
                 per_step: dict[str, Callable[[int], float]] | None = None,
                 process_index: int | None = None, process_count: int | None = None):
        self._arrays = arrays
        self._flip = flip
        self._per_step = per_step or {}
        self._stream = stream.ShuffledStream(len(arrays['x0']), batch_size, seed,
                                             process_index=process_index, process_count=process_count)
        self.permutation = self._stream.permutation
        self.local_ids = self._stream.local_ids

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`: x0, x1 as float32[, label][, per-step fields]."""
        ids = self.local_ids(step)
        batch = {name: self._arrays[name][ids].astype(np.float32) for name in _PAIR_FIELDS}
        if self._flip:
            flips = self._stream.local_coins(step, _PAIR_FLIP_SALT)
            for name in _PAIR_FIELDS:
                batch[name][flips] = batch[name][flips, :, ::-1]
        if 'label' in self._arrays:
            batch['label'] = self._arrays['label'][ids]
        for name, value in self._per_step.items():
            batch[name] = np.full((len(ids),), value(step), np.float32)
        return batch


def make_batches(path: str | epath.Path, mesh: Mesh, batch_size: int, seed: int, expect: dict | None = None, *,
                 flip: bool = False, per_step: dict[str, Callable[[int], float]] | None = None
                 ) -> Callable[[int], dict[str, jax.Array]]:
    """`batches(step) -> {'x0', 'x1'[, 'label'][, per_step fields]}`: global arrays sharded along 'data'.

    `flip` flips image pairs (x0 with its x1) at random; see `CouplingBatches`.
    """
    sharding.check_batch_size(batch_size, mesh, 'batch_size')
    store = open_store(path, expect)
    if flip and len(store.shape) != 3:
        raise errors.UserError(f'{path}: paired flips need image couplings (H, W, C); these have shape {store.shape}')
    reader = CouplingBatches(store.load(), batch_size, seed, flip=flip, per_step=per_step)
    return stream.global_batches(reader.local_batch, mesh)


class MixedCouplingBatches:
    """Stateless batches of two stores, `m` pairs of every batch from the second (docs/methods.md, Reflow (k-RF)).

    Rows [0, B - m) of global batch `step` are batch `step` of the main store's shuffled stream at
    batch size B - m; rows [B - m, B) batch `step` of the second store's at batch size m, whose
    permutations are drawn from (seed, another salt, epoch). Each store's epochs visit each of its
    pairs once; process p reads rows [p B / P, (p + 1) B / P), so a batch depends on (seed, step)
    only, not on the device or process count. Both stores hold the same fields (`label` in both or
    neither); x0 / x1 come back as float32.
    """

    def __init__(self, main: dict[str, np.ndarray], second: dict[str, np.ndarray], batch_size: int,
                 second_rows: int, seed: int, *, process_index: int | None = None,
                 process_count: int | None = None):
        pi = jax.process_index() if process_index is None else process_index
        pc = jax.process_count() if process_count is None else process_count
        if batch_size < 1 or batch_size % pc:
            raise errors.ConfigError(f'batch_size={batch_size}: must be a positive multiple of the process count '
                                     f'({pc})')
        if not 0 <= second_rows <= batch_size:
            raise errors.ConfigError(f'{second_rows} pairs of the second store in a batch of {batch_size}')
        if ('label' in main) != ('label' in second) or main['x0'].shape[1:] != second['x0'].shape[1:]:
            raise errors.UserError(f"mixed coupling stores differ: pairs of shape {main['x0'].shape[1:]} and "
                                   f"{second['x0'].shape[1:]}, labels {'label' in main} and {'label' in second}")
        self._stores = (main, second)
        self._sizes = (batch_size - second_rows, second_rows)

        def whole(arrays: dict[str, np.ndarray], size: int, **salt) -> stream.ShuffledStream | None:
            """A store's share of every global batch, all processes' rows."""
            if not size:
                return None
            return stream.ShuffledStream(len(arrays['x0']), size, seed, **salt, process_index=0, process_count=1)

        self._streams = (whole(main, self._sizes[0]), whole(second, second_rows, salt=_MIX_SHUFFLE_SALT))
        self._fields = _PAIR_FIELDS + (('label',) if 'label' in main else ())
        per = batch_size // pc
        self._rows = slice(pi * per, (pi + 1) * per)

    def global_ids(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(store 0 or 1, row id in that store) of every row of global batch `step`."""
        which = np.repeat(np.arange(2), self._sizes)
        ids = np.concatenate([s.local_ids(step) for s in self._streams if s is not None])
        return which, ids

    def local_ids(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """`global_ids` of this process's rows."""
        which, ids = self.global_ids(step)
        return which[self._rows], ids[self._rows]

    def local_batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`: x0, x1 as float32[, label]."""
        which, ids = self.local_ids(step)  # `which` is sorted: the main store's rows come first
        batch = {}
        for name in self._fields:
            parts = [arrays[name][ids[which == s]] for s, arrays in enumerate(self._stores)]
            parts = [p.astype(np.float32) for p in parts] if name in _PAIR_FIELDS else parts
            batch[name] = np.concatenate(parts)
        return batch


def check_same_layout(main: Store, second: Store) -> None:
    """Refuses (one line) two stores whose pairs cannot share a batch: another shape or label layout."""
    layout = lambda store: {'shape': list(store.shape), 'num_classes': store.manifest.get('num_classes') or 0}
    if layout(main) != layout(second):
        raise errors.UserError(f'{second.path}: coupling store has {layout(second)} but {main.path} has '
                               f'{layout(main)}; mixed stores must hold pairs of the same shape and labels')


def make_mixed_batches(path: str | epath.Path, second: str | epath.Path, second_rows: int, mesh: Mesh,
                       batch_size: int, seed: int, expect: dict | None = None) -> Callable[[int], dict[str, jax.Array]]:
    """`batches(step) -> {'x0', 'x1'[, 'label']}` with `second_rows` pairs of each batch from the store
    at `second`, the rest from the one at `path` (see `MixedCouplingBatches`)."""
    sharding.check_batch_size(batch_size, mesh, 'batch_size')
    main, other = open_store(path, expect), open_store(second, expect)
    check_same_layout(main, other)
    reader = MixedCouplingBatches(main.load(), other.load(), batch_size, second_rows, seed)
    return stream.global_batches(reader.local_batch, mesh)
