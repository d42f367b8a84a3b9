"""The device mesh flowjax runs on: one 'data' axis over every device of every process; moving
arrays to the host, splitting per-row host work over the processes and waiting for the other processes."""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flowjax import errors


def data_mesh(devices=None) -> Mesh:
    """`devices` (all devices of all processes by default) on one data-parallel axis.

    All devices are ordered by process, so each process's devices hold one contiguous block of a
    global batch: the rows `stream.ShuffledStream` gives that process. Auto axis type: jit with
    NamedSharding lets GSPMD place the gradient all-reduce.
    """
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P('data'))


def check_batch_size(batch_size: int, mesh: Mesh, field: str = 'train.batch_size') -> None:
    """The global batch must split evenly over the devices."""
    n = mesh.devices.size
    if batch_size < 1 or batch_size % n:
        raise errors.ConfigError(f'{field}={batch_size}: must be a positive multiple of the device count ({n})')


def to_host(x) -> np.ndarray:
    """`x` as a numpy array on every process; the rows of a global array that other processes hold are gathered."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def barrier(name: str) -> None:
    """Waits until every process gets here (a no-op in one process): after process 0 writes a file the others read."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class Share(NamedTuple):
    """This process's part of a batch of `count` rows: the indices `ids` (sorted) of the rows it holds and
    `values`, those rows on the host (an array, or a dict of arrays with the same keys in the same order on
    every process; rows along the first axis). `whole`: the batch is all here (one process, or an array of
    this process's devices only), so nothing is gathered."""

    ids: np.ndarray
    values: np.ndarray | dict[str, np.ndarray]
    count: int
    whole: bool


def share(x: jax.Array, count: int | None = None, axis: int = 0) -> Share:
    """This process's rows, along `axis`, among the first `count` (all by default) of `x`: each row of a global
    array goes to exactly one process, the one whose device holds its first replica."""
    count = x.shape[axis] if count is None else count
    if x.is_fully_addressable:
        rows = np.moveaxis(np.asarray(x), axis, 0)[:count]
        return Share(np.arange(len(rows)), rows, count, True)
    ids, rows = [], []
    for s in sorted((s for s in x.addressable_shards if s.replica_id == 0), key=lambda s: s.index[axis].start or 0):
        data = np.moveaxis(np.asarray(s.data), axis, 0)
        index = np.arange(s.index[axis].start or 0, (s.index[axis].start or 0) + len(data))
        ids.append(index[index < count])
        rows.append(data[:len(ids[-1])])
    trailing = tuple(np.delete(x.shape, axis))
    return Share(np.concatenate(ids or [np.zeros(0, np.int64)]),
                 np.concatenate(rows) if rows else np.zeros((0, *trailing), x.dtype), count, False)


def held_rows(x: jax.Array, count: int | None = None) -> int:
    """How many of the first `count` rows of `x` this process's devices hold (what they computed of it)."""
    count = len(x) if count is None else count
    if x.is_fully_addressable:
        return min(count, len(x))
    held = np.zeros(len(x), bool)
    for s in x.addressable_shards:
        held[s.index[0]] = True
    return int(held[:count].sum())


def _row_bytes(a: np.ndarray) -> int:
    return a.dtype.itemsize * math.prod(a.shape[1:])


def _arrays(values: np.ndarray | dict[str, np.ndarray]) -> list[np.ndarray]:
    return [values[k] for k in values] if isinstance(values, dict) else [values]


def _as_bytes(ids: np.ndarray, arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Rows as bytes, (n, 4 + row bytes): each row's id (int32), then its bytes of every array."""
    parts = [ids.astype(np.int32).view(np.uint8).reshape(-1, 4)]
    parts += [np.ascontiguousarray(a).reshape(len(a), -1 if len(a) else 0).view(np.uint8) for a in arrays]
    return np.concatenate(parts, axis=1)


def _from_bytes(rows: np.ndarray, like: Sequence[np.ndarray], count: int) -> list[np.ndarray]:
    """The arrays of `count` rows, shaped as `like`'s rows, from every process's `_as_bytes` rows."""
    ids = np.ascontiguousarray(rows[:, :4]).view(np.int32)[:, 0]
    if len(ids) != count or not np.array_equal(np.sort(ids), np.arange(count)):
        raise RuntimeError(f'gather: the processes hold {len(ids)} rows of a batch of {count}, not each row once')
    out, column = [], 4
    for a in like:
        width = _row_bytes(a)
        full = np.empty((count, *a.shape[1:]), a.dtype)
        full[ids] = np.ascontiguousarray(rows[:, column:column + width]).view(a.dtype).reshape(len(ids), *a.shape[1:])
        out.append(full)
        column += width
    return out


def gather(shares: Sequence[Share]) -> list[np.ndarray | dict[str, np.ndarray]]:
    """Every row of each share's batch on every process, in row order (values shaped as the shares' are): the
    parts other processes hold are all-gathered as bytes (two collectives for all the shares), so every dtype
    keeps its bits. Every process passes its shares of the same batches, in the same order."""
    out = [s.values for s in shares]
    spread = [i for i, s in enumerate(shares) if not s.whole]
    if not spread:
        return out
    arrays = [_arrays(shares[i].values) for i in spread]
    widths = np.asarray([4 + sum(map(_row_bytes, group)) for group in arrays])
    mine = np.asarray([len(shares[i].ids) for i in spread], np.int32)
    counts = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), len(spread))
    packed = np.concatenate([_as_bytes(shares[i].ids, group).reshape(-1) for i, group in zip(spread, arrays)])
    buffer = np.zeros(max(int((counts @ widths).max()), 1), np.uint8)
    buffer[:len(packed)] = packed
    everything = np.asarray(multihost_utils.process_allgather(buffer)).reshape(jax.process_count(), -1)
    ends = np.cumsum(counts * widths, axis=1)
    for k, (i, group) in enumerate(zip(spread, arrays)):
        rows = np.concatenate([everything[p, ends[p, k] - counts[p, k] * widths[k]:ends[p, k]].reshape(-1, widths[k])
                               for p in range(jax.process_count())])
        full = _from_bytes(rows, group, shares[i].count)
        values = shares[i].values
        out[i] = dict(zip(values, full)) if isinstance(values, dict) else full[0]
    return out


def map_rows(fn: Callable[..., Any], *arrays: jax.Array, count: int | None = None, axis: int = 0) -> Any:
    """`fn(*rows)` of the first `count` rows (along `axis`) of `arrays`, on every process: each process applies `fn`
    to the rows it holds (host arrays, rows still along `axis`), and the per-row results (rows along the first
    axis; an array or a dict of arrays) are gathered in row order. An array whose rows are placed otherwise than
    the first's is moved to the first's row split."""
    first = arrays[0]
    parts = [share(first, count, axis)]
    for a in arrays[1:]:
        part = share(a, count, axis)
        if not np.array_equal(part.ids, parts[0].ids) and isinstance(first.sharding, NamedSharding):
            spec = [None] * a.ndim
            spec[axis] = tuple(first.sharding.spec)[axis] if len(first.sharding.spec) > axis else None
            part = share(jax.device_put(a, NamedSharding(first.sharding.mesh, P(*spec))), count, axis)
        if not np.array_equal(part.ids, parts[0].ids):
            raise RuntimeError('map_rows: the arrays split their rows over the processes differently')
        parts.append(part)
    return gather([parts[0]._replace(values=fn(*(np.moveaxis(p.values, 0, axis) for p in parts)))])[0]


def head(x: jax.Array, count: int) -> np.ndarray:
    """The first `count` rows of `x` on the host of every process (only those rows travel)."""
    return map_rows(lambda rows: rows, x, count=count)


def leading(x: jax.Array, count: int) -> jax.Array:
    """The first `count` rows of `x` placed as `x` is: rounded up to a multiple of its row split (`x` itself when
    that is all of it)."""
    split = len(x) // x.sharding.shard_shape(x.shape)[0]
    rows = -(-count // split) * split
    return x if rows >= len(x) else _leading_fn(rows, x.sharding)(x)


@functools.lru_cache(maxsize=16)
def _leading_fn(rows: int, placement: jax.sharding.Sharding):
    return jax.jit(lambda x: x[:rows], out_shardings=placement)


def put_rows(read: Callable[[np.ndarray], np.ndarray], count: int, rows: int, placement: NamedSharding) -> jax.Array:
    """A global array of `rows` rows placed by `placement` along its first axis, rows `ids < count` from
    `read(ids)` (float32 or any dtype) and zeros after: each process reads only the rows its devices hold."""
    held = np.zeros(rows, bool)
    for index in placement.addressable_devices_indices_map((rows,)).values():
        held[index[0]] = True
    ids = np.flatnonzero(held)
    block = read(ids[ids < count])
    local = np.zeros((len(ids), *block.shape[1:]), block.dtype)
    local[:len(block)] = block
    return jax.make_array_from_callback((rows, *block.shape[1:]), placement,
                                        lambda index: local[np.searchsorted(ids, np.arange(rows)[index[0]])]
                                        [(slice(None), *index[1:])])
