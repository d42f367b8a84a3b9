"""The device mesh flowjax runs on: one 'data' axis over every device of every process."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flowjax import errors


def data_mesh(devices=None) -> Mesh:
    """`devices` (all devices of all processes by default) on one data-parallel axis.

    Auto axis type: jit with NamedSharding lets GSPMD place the gradient all-reduce.
    """
    return Mesh(np.asarray(jax.devices() if devices is None else devices), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P('data'))


def check_batch_size(batch_size: int, mesh: Mesh, field: str = 'train.batch_size') -> None:
    """The global batch must split evenly over the devices."""
    n = mesh.devices.size
    if batch_size < 1 or batch_size % n:
        raise errors.ConfigError(f'{field}={batch_size}: must be a positive multiple of the device count ({n})')
