"""The device mesh flowjax runs on: one 'data' axis over every device of every process; moving
arrays to the host and waiting for the other processes."""

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
