"""The coupling store: teacher pairs (x0 noise, x1 data) written in shards, read back shuffled.

Layout of a store directory (local or bucket, through `etils.epath`):
    manifest.json        how the pairs were made; `complete: true` once every shard exists
    shard-000000.npz     pairs [k * S, min((k + 1) * S, N)): x0, x1, index (int64), nfe (int32)[, label]

A shard appears under its final name only when fully written (temporary name, then rename),
so "the file exists" means "the shard is complete". bfloat16 / float16 pairs are stored as
uint16 views; the manifest's `dtype` says how to read them back.

Training reads a store streaming (`Store.columns`; `make_batches`, `make_mixed_batches`): at open,
each shard's zip directory and .npy headers are parsed and its index read and checked; a batch
then reads each of its rows as one contiguous byte range of the uncompressed members np.savez
writes (the rows sorted, adjacent rows of a shard read in one os.preadv, after a read-ahead hint
for all of them so that a disk serves the rows not in the page cache in parallel), from a few
cached file descriptors, safely from any thread. Host memory is the batch being read whatever
the store's size, and every store of this format reads as it was written. `Store.load` (tests,
small stores) and `Store.head` read whole shards.
"""

import collections
import concurrent.futures
import dataclasses
import functools
import io
import json
import math
import os
import struct
import threading
import uuid
import weakref
import zipfile
from collections.abc import Callable, Mapping
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


def _check_shard(file: epath.Path, k: int, manifest: dict, shapes: dict[str, tuple[int, ...]],
                 index: np.ndarray | None) -> None:
    """Refuses (one line, naming `file`) shard k whose member `shapes` or `index` are not the manifest's."""
    lo, hi = shard_range(k, manifest['num_pairs'], manifest['shard_size'])
    expect = {'x0': (hi - lo, *manifest['shape']), 'x1': (hi - lo, *manifest['shape']),
              'index': (hi - lo,), 'nfe': (hi - lo,), 'label': (hi - lo,)}
    for name, shape in expect.items():
        if name in shapes and shapes[name] != shape:
            raise errors.UserError(f'{file}: corrupted coupling shard ({name} has shape '
                                   f'{shapes[name]}, expected {shape}); delete it and rerun the generate stage')
    if index is not None and not np.array_equal(index, np.arange(lo, hi)):
        raise errors.UserError(f'{file}: corrupted coupling shard (index is not {lo}..{hi - 1}); '
                               'delete it and rerun the generate stage')


def _corrupted(file: epath.Path, e: Exception) -> errors.UserError:
    return errors.UserError(f'{file}: truncated or corrupted coupling shard ({type(e).__name__}: '
                            f"{' '.join(str(e).split())}); delete it and rerun the generate stage")


def read_shard(path: str | epath.Path, k: int, manifest: dict, names: tuple[str, ...] | None = None) -> dict:
    """Shard k's arrays (x0 / x1 in the storage dtype), checked; one-line error naming a bad file."""
    file = shard_path(path, k)
    try:
        with file.open('rb') as f, np.load(f, allow_pickle=False) as npz:
            names = names or tuple(npz.files)
            arrays = {name: npz[name] for name in names}
    except Exception as e:  # truncated zip, bad header, missing member: all mean the same to the user
        raise _corrupted(file, e) from None
    _check_shard(file, k, manifest, {name: a.shape for name, a in arrays.items()}, arrays.get('index'))
    dtype = manifest['dtype']
    for name in _PAIR_FIELDS:
        if name in arrays and dtype != 'float32':
            arrays[name] = arrays[name].view(DTYPES[dtype])
    return arrays


# ----------------------------------------------------------------------------------------------
# The streaming reader: rows read straight out of the shards' .npz members, on demand.
# ----------------------------------------------------------------------------------------------

_ZIP_LOCAL_HEADER = struct.Struct('<4s22xHH')  # signature, 22 bytes, file name length, extra field length
_REQUIRED = ('x0', 'x1', 'index', 'nfe')
_IOV_MAX = 1024  # buffers one os.preadv call takes (the Linux and macOS limit)
OPEN_FILES = 128  # shard files a reader keeps open at most
REMOTE_THREADS = 16  # threads reading a batch's rows of a store on a bucket (and checking its shards at open)


def _is_local(path: epath.Path) -> bool:
    return '://' not in str(path)


@dataclasses.dataclass(frozen=True)
class _Member:
    """Where one .npy member's array lies in a shard file: the byte offset of its data, dtype and shape."""
    offset: int
    dtype: np.dtype
    shape: tuple[int, ...]


def _member_layouts(file: epath.Path) -> tuple[dict[str, _Member], np.ndarray | None]:
    """The layout of every member of the .npz `file` (its zip directory and the members' headers) and
    its index array (read whole, CRC-checked). A compressed or Fortran-order member is refused."""
    members = {}
    with file.open('rb') as f, zipfile.ZipFile(f) as archive:
        for info in archive.infolist():
            name = info.filename.removesuffix('.npy')
            if info.compress_type != zipfile.ZIP_STORED:
                raise errors.UserError(f'{file}: coupling shard member {name} is compressed; the reader needs the '
                                       'uncompressed members np.savez writes (regenerate the store)')
            f.seek(info.header_offset)
            signature, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(f.read(_ZIP_LOCAL_HEADER.size))
            if signature != b'PK\x03\x04':
                raise zipfile.BadZipFile(f'no local file header for {info.filename}')
            start = info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length
            f.seek(start)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f'{info.filename} is in .npy format {version}, not 1.0 or 2.0')
            if fortran and len(shape) > 1:
                raise errors.UserError(f'{file}: coupling shard member {name} is in Fortran order; the reader needs '
                                       'the C order np.savez writes (regenerate the store)')
            if dtype.hasobject:
                raise ValueError(f'{info.filename} holds Python objects')
            offset = f.tell()
            if offset - start + math.prod(shape) * dtype.itemsize != info.file_size:
                raise ValueError(f'{info.filename} holds {info.file_size} bytes, not its header and {shape} {dtype}')
            members[name] = _Member(offset, dtype, tuple(shape))
        index = np.lib.format.read_array(archive.open('index.npy'), allow_pickle=False) if 'index' in members else None
    return members, index


def _open_shard(path: epath.Path, k: int, manifest: dict) -> dict[str, _Member]:
    """Shard k's member layouts, checked as `read_shard` checks its arrays (and the pairs' storage dtype)."""
    file = shard_path(path, k)
    try:
        members, index = _member_layouts(file)
        missing = [name for name in _REQUIRED if name not in members]
        if missing:
            raise KeyError(f"{', '.join(missing)} not in the archive")
    except errors.UserError:
        raise
    except Exception as e:  # as in read_shard: truncated zip, bad header, missing member
        raise _corrupted(file, e) from None
    _check_shard(file, k, manifest, {name: m.shape for name, m in members.items()}, index)
    storage = np.dtype(np.float32 if manifest['dtype'] == 'float32' else np.uint16)
    for name in _PAIR_FIELDS:
        if members[name].dtype != storage:
            raise errors.UserError(f'{file}: corrupted coupling shard ({name} has dtype {members[name].dtype}, '
                                   f"expected {storage} for dtype={manifest['dtype']!r}); delete it and rerun the "
                                   'generate stage')
    return members


def _fill(read: Callable[[list[memoryview], int], int], buffers: list[memoryview], offset: int, done: int) -> int:
    """Reads the bytes at `offset` on into `buffers` through `read(buffers, offset) -> count` (a call may
    read fewer), the first `done` bytes already read, until they are full or the file ends; returns the count."""
    i, skip = 0, done
    while True:
        while i < len(buffers) and skip >= len(buffers[i]):
            skip -= len(buffers[i])
            i += 1
        if i == len(buffers):
            return done
        buffers[i] = buffers[i][skip:]
        skip = read(buffers[i:], offset + done)
        if not skip:
            return done
        done += skip


class _Descriptor:
    """A local shard file, read with os.preadv: no shared file position, so any thread may read."""

    def __init__(self, file: epath.Path):
        self.fd = os.open(os.fspath(file), os.O_RDONLY)
        self.users = 0
        self.evicted = False

    def read(self, buffers: list[memoryview], offset: int) -> int:
        return os.preadv(self.fd, buffers, offset)

    def hint(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        os.close(self.fd)


class _Stream:
    """A shard file elsewhere (a bucket), opened for one read task and read with seek + read."""

    def __init__(self, file: epath.Path):
        self._file = file.open('rb')

    def read(self, buffers: list[memoryview], offset: int) -> int:
        self._file.seek(offset)
        data = memoryview(self._file.read(sum(len(b) for b in buffers)))
        at = 0
        for buffer in buffers:
            part = data[at:at + len(buffer)]
            buffer[:len(part)] = part
            at += len(part)
        return at

    def close(self) -> None:
        self._file.close()


def _close_all(handles: dict) -> None:
    for handle in handles.values():
        handle.close()
    handles.clear()


class _ShardFiles:
    """A store's shard files, open for reads from any thread: local files as at most OPEN_FILES cached
    descriptors (the least recently used closed first, once no read holds it), others opened per task."""

    def __init__(self, files: list[epath.Path], hints: bool):
        self.files = files
        self._local = _is_local(files[0]) and hasattr(os, 'preadv')
        self.hints = hints and self._local and hasattr(os, 'posix_fadvise')  # Linux: read-ahead of a batch's rows
        self._limit = OPEN_FILES
        self._lock = threading.Lock()
        self._open: collections.OrderedDict[int, _Descriptor] = collections.OrderedDict()
        weakref.finalize(self, _close_all, self._open)

    def acquire(self, k: int) -> _Descriptor | _Stream:
        if not self._local:
            return _Stream(self.files[k])
        with self._lock:
            handle = self._open.get(k)
            if handle is None:
                handle = self._open[k] = _Descriptor(self.files[k])
                while len(self._open) > self._limit:
                    _, old = self._open.popitem(last=False)
                    old.evicted = True
                    if not old.users:
                        old.close()
            else:
                self._open.move_to_end(k)
            handle.users += 1
        return handle

    def release(self, handle: _Descriptor | _Stream) -> None:
        if isinstance(handle, _Stream):
            handle.close()
            return
        with self._lock:
            handle.users -= 1
            if handle.evicted and not handle.users:
                handle.close()


class Column:
    """One member (x0, x1, index, nfe, label) of every shard of a store, its rows read from the files
    when asked for: `len`, `shape`, `dtype` and `column[ids]` (a 1-d integer array: those rows, in that
    order, as a fresh array) behave as a numpy array's; x0 / x1 come in the dtype `Store.load` gives."""

    def __init__(self, files: _ShardFiles, offsets: list[int], shard_size: int, num_rows: int,
                 stored: np.dtype, dtype: Any, row_shape: tuple[int, ...],
                 pool: concurrent.futures.ThreadPoolExecutor | None, threads: int):
        self._files = files
        self._offsets = np.asarray(offsets, np.int64)
        self._shard_size = shard_size
        self._stored = stored
        self._row_bytes = stored.itemsize * math.prod(row_shape)
        self._pool = pool
        self._threads = threads
        self.shape = (num_rows, *row_shape)
        self.dtype = np.dtype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, ids: Any) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise TypeError(f'coupling columns take a 1-d array of row ids, not {ids.dtype} of shape {ids.shape}')
        ids = ids.astype(np.int64, copy=False)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f'row ids {ids.min()}..{ids.max()} outside a coupling column of {len(self)} rows')
        out = np.empty((len(ids), *self.shape[1:]), self._stored)
        runs, order = self._runs(ids)
        view = memoryview(out.reshape(-1).view(np.uint8))
        per = -(-len(runs) // self._threads)
        if self._pool is None or len(runs) < 2 * self._threads:
            self._read(view, order, runs)
        else:  # a few contiguous parts of the sorted runs: each thread keeps to few files
            parts = [runs[i:i + per] for i in range(0, len(runs), per)]
            for done in [self._pool.submit(self._read, view, order, part) for part in parts]:
                done.result()
        return out if self.dtype == self._stored else out.view(self.dtype)

    def _runs(self, ids: np.ndarray) -> tuple[list[tuple[int, int, int, int]], list[int]]:
        """(shard, byte offset, lo, hi): runs of adjacent rows of one shard in sorted `ids`, read in
        one call into output rows order[lo:hi] (order: the positions of the sorted ids in `ids`)."""
        order = np.argsort(ids, kind='stable')
        rows = ids[order]
        shard = rows // self._shard_size
        first = (np.diff(rows, prepend=-2) != 1) | (np.diff(shard, prepend=-1) != 0)
        if len(rows) > _IOV_MAX:  # no run longer than the buffers one call takes
            at = np.arange(len(rows)) - np.flatnonzero(first)[np.cumsum(first) - 1]
            first |= at % _IOV_MAX == 0
        starts = np.flatnonzero(first)
        stops = np.append(starts[1:], len(rows))
        offsets = self._offsets[shard[starts]] + (rows[starts] - shard[starts] * self._shard_size) * self._row_bytes
        runs = list(zip(shard[starts].tolist(), offsets.tolist(), starts.tolist(), stops.tolist()))
        return runs, order.tolist()

    def _read(self, view: memoryview, order: list[int], runs: list[tuple[int, int, int, int]]) -> None:
        """Reads the runs into their rows of `view` (local files: after telling the kernel of them all,
        so that it fetches the rows not in the page cache in parallel)."""
        size = self._row_bytes

        def read(handle: _Descriptor | _Stream, offset: int, lo: int, hi: int) -> None:
            buffers = [view[p * size:(p + 1) * size] for p in order[lo:hi]]
            got, want = handle.read(buffers, offset), (hi - lo) * size
            if got != want and _fill(handle.read, buffers, offset, got) != want:
                raise EOFError(f'{want} bytes at {offset} run past the end of the file')

        if self._files.hints:
            self._each_run(runs, lambda handle, offset, lo, hi: handle.hint(offset, (hi - lo) * size))
        self._each_run(runs, read)

    def _each_run(self, runs: list[tuple[int, int, int, int]], fn: Callable[..., None]) -> None:
        """fn(handle of the run's shard file, offset, lo, hi) for each run; a failed read names the file."""
        handle, current = None, -1
        try:
            for k, offset, lo, hi in runs:
                if k != current:
                    if handle is not None:
                        self._files.release(handle)
                        handle = None
                    current = k
                    handle = self._files.acquire(k)
                fn(handle, offset, lo, hi)
        except (OSError, EOFError) as e:
            raise _corrupted(self._files.files[current], e) from None
        finally:
            if handle is not None:
                self._files.release(handle)


class Store:
    """A complete coupling store. `columns()` reads the pairs a batch needs straight from the shards
    (what training uses); `load()` reads every shard into host memory (small stores, tests)."""

    def __init__(self, path: epath.Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._arrays: dict[str, np.ndarray] | None = None
        self._columns: dict[str, Column] | None = None

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

    def columns(self, threads: int | None = None, hints: bool = True) -> dict[str, Column]:
        """Every member as a `Column` whose rows are read from the shards when asked for (host memory: the
        rows asked for), after a check of every shard (zip directory, .npy headers, shapes, index; one-line
        error naming a bad file) that reads only its index; cached. `threads` read a batch's rows (default:
        one for local files, REMOTE_THREADS for a bucket); `hints`: tell the kernel of a batch's rows first."""
        if self._columns is None:
            n = num_shards(self.num_pairs, self.manifest['shard_size'])
            threads = threads or (1 if _is_local(self.path) else REMOTE_THREADS)
            pool = concurrent.futures.ThreadPoolExecutor(threads, 'flowjax-couplings') if threads > 1 else None
            check = functools.partial(_open_shard, self.path, manifest=self.manifest)
            layouts = list(pool.map(check, range(n)) if pool else map(check, range(n)))
            kinds = lambda members: {name: str(m.dtype) for name, m in members.items()}
            for k, members in enumerate(layouts):
                if kinds(members) != kinds(layouts[0]):
                    raise errors.UserError(f'{shard_path(self.path, k)}: corrupted coupling shard (members '
                                           f'{kinds(members)}, but {shard_path(self.path, 0).name} has '
                                           f'{kinds(layouts[0])}); delete it and rerun the generate stage')
            files = _ShardFiles([shard_path(self.path, k) for k in range(n)], hints)
            self._columns = {}
            for name, first in layouts[0].items():
                pairs = name in _PAIR_FIELDS
                self._columns[name] = Column(
                    files, [members[name].offset for members in layouts], self.manifest['shard_size'],
                    self.num_pairs, first.dtype, DTYPES[self.manifest['dtype']] if pairs else first.dtype,
                    first.shape[1:], pool, threads)
        return self._columns


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

    def __init__(self, arrays: Mapping[str, np.ndarray | Column], batch_size: int, seed: int, *, flip: bool = False,
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
    reader = CouplingBatches(store.columns(), batch_size, seed, flip=flip, per_step=per_step)
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

    def __init__(self, main: Mapping[str, np.ndarray | Column], second: Mapping[str, np.ndarray | Column],
                 batch_size: int, second_rows: int, seed: int, *, process_index: int | None = None,
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

        def whole(arrays: Mapping[str, np.ndarray | Column], size: int, **salt) -> stream.ShuffledStream | None:
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
    reader = MixedCouplingBatches(main.columns(), other.columns(), batch_size, second_rows, seed)
    return stream.global_batches(reader.local_batch, mesh)
