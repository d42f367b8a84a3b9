"""The order in which a training run reads a host-side dataset, and its transfer to the mesh.

Global batch `step` is rows [step * B, (step + 1) * B) of the stream perm_0 ++ perm_1 ++ ...,
perm_e a permutation of all N rows drawn from (seed, salt, epoch e); process p of P reads rows
[p B / P, (p + 1) B / P) of it. The order is stateless in `step` (a resumed run needs no reader
state), the same for any number of devices or processes, and each epoch visits every row once.
"""

import collections
import concurrent.futures
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flowjax import errors

_SHUFFLE_SALT = 0x5EED


class ShuffledStream:
    """Row ids of this process's share of each global batch."""

    def __init__(self, num_rows: int, batch_size: int, seed: int, *, salt: int = _SHUFFLE_SALT,
                 process_index: int | None = None, process_count: int | None = None):
        self.num_rows = num_rows
        self.batch_size = batch_size
        self.seed = seed
        self.salt = salt  # another salt: another sequence of permutations for the same seed
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if batch_size < 1 or batch_size % self.process_count:
            raise errors.ConfigError(
                f'batch_size={batch_size}: must be a positive multiple of the process count ({self.process_count})')
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # readers in several threads share the cache

    @property
    def local_rows(self) -> slice:
        """This process's rows within a global batch."""
        per = self.batch_size // self.process_count
        return slice(self.process_index * per, (self.process_index + 1) * per)

    def permutation(self, epoch: int) -> np.ndarray:
        """perm_e, the order of epoch e (the last two used are cached)."""
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                if len(self._perms) >= 2:
                    self._perms.pop(min(self._perms))
                rng = np.random.default_rng([self.seed, self.salt, epoch])
                perm = self._perms[epoch] = rng.permutation(self.num_rows)
            return perm

    def local_coins(self, step: int, salt: int) -> np.ndarray:
        """A fair coin per row of global batch `step` drawn from (seed, salt, step): this process's share (bool)."""
        coins = np.random.default_rng([self.seed, salt, step]).random(self.batch_size) < 0.5
        return coins[self.local_rows]

    def local_ids(self, step: int) -> np.ndarray:
        """Dataset row ids of this process's rows of global batch `step`."""
        rows = np.arange(self.batch_size, dtype=np.int64)[self.local_rows] + step * self.batch_size
        epochs, positions = np.divmod(rows, self.num_rows)
        ids = np.empty_like(rows)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            ids[mask] = self.permutation(int(epoch))[positions[mask]]
        return ids


def global_batches(local_batch: Callable[[int], dict[str, np.ndarray]],
                   mesh: Mesh) -> Callable[[int], dict[str, jax.Array]]:
    """`batches(step)`: each process's rows assembled into global arrays sharded along 'data'."""
    batch_sharding = NamedSharding(mesh, P('data'))

    def batches(step: int) -> dict[str, jax.Array]:
        return {name: jax.make_array_from_process_local_data(batch_sharding, value)
                for name, value in local_batch(step).items()}

    return batches


def read_ahead(fn: Callable[[Any], Any], items: Sequence[Any], depth: int) -> Iterator[Any]:
    """Yields fn(item) for the items in order; one background thread computes up to `depth` of them
    ahead (0: each when asked for). An exception in `fn` is raised where its result is yielded."""
    if depth < 1:
        yield from map(fn, items)
        return
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='flowjax-read-ahead')
    try:
        ahead = collections.deque(pool.submit(fn, item) for item in items[:depth])
        for item in items[depth:]:
            done = ahead.popleft().result()
            ahead.append(pool.submit(fn, item))
            yield done
        while ahead:
            yield ahead.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
