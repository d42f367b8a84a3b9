"""How fast, and in how much host memory, training reads a coupling store: the full-load reader
(`Store.load`), the streaming reader (`Store.columns`: rows read out of the .npz shards) and, as
the alternative format, the same pairs saved as .npy files read through np.load(mmap_mode='r').

    python benchmarks/coupling_reader.py
    python benchmarks/coupling_reader.py --pairs 100000 --shard_size 10000 --threads 1 8

Writes `--pairs` random CIFAR-shaped pairs (32x32x3, bfloat16 storage, labels) in shards of
`--shard_size` to a temporary directory, and the same pairs as x0.npy / x1.npy / label.npy. Each
case runs in its own process (a clean peak RSS) and reads `--steps` batches of `CouplingBatches`
(one process's whole batch, float32, as training gets them), the files in the page cache (warm:
read once first) or dropped from it (cold: posix_fadvise DONTNEED, so the disk serves each first
read). `pread xN` is the streaming reader with N threads, `no hints` without its read-ahead hints.
Columns, each the median of `--repeats` processes: the time to open the data (load it, check the
shards), rows/s and ms of the median batch, the tracemalloc peak over a second pass (open and 10
batches) and the growth of the process's peak RSS over the timed pass (Linux). Prints one table.
"""

import argparse
import gc
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import measure  # noqa: E402

COLUMNS = (('reader', 'reader', ''), ('batch', 'batch', ''), ('cache', 'cache', ''), ('open_s', 'open s', '.2f'),
           ('rows_per_s', 'rows/s', ',.0f'), ('ms_per_batch', 'ms/batch', '.2f'),
           ('traced_mib', 'tracemalloc peak MiB', ',.1f'), ('rss_mib', 'peak RSS growth MiB', ',.1f'),
           ('note', 'note', ''))
MIB = 2 ** 20


def build(root: pathlib.Path, pairs: int, shard_size: int) -> None:
    """The store at root/store and the same pairs as root/<name>.npy, all flushed to the disk."""
    import ml_dtypes
    import numpy as np

    from flowjax.data import couplings

    shape, store = (32, 32, 3), root / 'store'
    store.mkdir()
    manifest = {'version': couplings.FORMAT_VERSION, 'num_pairs': pairs, 'shard_size': shard_size,
                'dtype': 'bfloat16', 'shape': list(shape), 'num_classes': 10, 'complete': True}
    couplings.write_manifest(store, manifest)
    npy = {name: np.lib.format.open_memmap(root / f'{name}.npy', 'w+', np.uint16, (pairs, *shape))
           for name in ('x0', 'x1')}
    npy['label'] = np.lib.format.open_memmap(root / 'label.npy', 'w+', np.int32, (pairs,))
    rng = np.random.default_rng(0)
    for k in range(couplings.num_shards(pairs, shard_size)):
        lo, hi = couplings.shard_range(k, pairs, shard_size)
        arrays = {'x0': rng.standard_normal((hi - lo, *shape), np.float32),
                  'x1': rng.uniform(-1, 1, (hi - lo, *shape)).astype(np.float32),
                  'index': np.arange(lo, hi), 'nfe': np.full(hi - lo, 127, np.int32),
                  'label': rng.integers(0, 10, hi - lo).astype(np.int32)}
        couplings.write_shard(store, k, arrays, 'bfloat16')
        for name in ('x0', 'x1'):
            npy[name][lo:hi] = arrays[name].astype(ml_dtypes.bfloat16).view(np.uint16)
        npy['label'][lo:hi] = arrays['label']
    for array in npy.values():
        array.flush()
    del npy
    for file in files(root):
        fd = os.open(file, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted((root / 'store').iterdir()) + sorted(root.glob('*.npy'))


def set_cache(root: pathlib.Path, cache: str) -> None:
    """Every file read once (warm) or dropped from the page cache (cold)."""
    for file in files(root):
        fd = os.open(file, os.O_RDONLY)
        if cache == 'cold':
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        else:
            while os.read(fd, 1 << 22):
                pass
        os.close(fd)


def open_data(root: pathlib.Path, reader: str) -> dict:
    """What `CouplingBatches` reads: the loaded arrays, the streaming columns or memory maps."""
    import ml_dtypes
    import numpy as np

    from flowjax.data import couplings

    if reader == 'load':
        return couplings.open_store(root / 'store').load()
    if reader.startswith('pread'):  # 'pread xN' or 'pread xN, no hints'
        threads = int(reader.split('x')[1].split(',')[0])
        return couplings.open_store(root / 'store').columns(threads=threads, hints='no hints' not in reader)
    maps = {name: np.load(root / f'{name}.npy', mmap_mode='r') for name in ('x0', 'x1', 'label')}
    return {**maps, 'x0': maps['x0'].view(ml_dtypes.bfloat16), 'x1': maps['x1'].view(ml_dtypes.bfloat16)}


def rss(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak since the last `reset_peak`) of this process, in bytes."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ':'))


def reset_peak() -> None:
    with open('/proc/self/clear_refs', 'w') as f:  # '5': the peak RSS restarts from the current RSS (Linux)
        f.write('5')


def run_case(case: dict) -> dict:
    from flowjax.data import couplings

    root, reader, batch = pathlib.Path(case['root']), case['reader'], case['batch']
    set_cache(root, case['cache'])
    reset_peak()
    base = rss('VmRSS')
    started = time.perf_counter()
    data = open_data(root, reader)
    opened = time.perf_counter()
    batches = couplings.CouplingBatches(data, batch, seed=0, process_index=0, process_count=1)
    times = []
    for step in range(case['steps']):
        times.append(time.perf_counter())
        batches.local_batch(step)
    times.append(time.perf_counter())
    seconds = statistics.median(b - a for a, b in zip(times, times[1:]))
    peak = rss('VmHWM')
    del data, batches
    gc.collect()
    tracemalloc.start()
    batches = couplings.CouplingBatches(open_data(root, reader), batch, seed=0, process_index=0, process_count=1)
    for step in range(10):
        batches.local_batch(step)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {**case, 'open_s': opened - started, 'rows_per_s': batch / seconds, 'ms_per_batch': 1e3 * seconds,
            'traced_mib': traced / MIB, 'rss_mib': (peak - base) / MIB}


def median(runs: list[dict]) -> dict:
    """The runs of one case, each number their median (the machine may be shared)."""
    numbers = [key for key, value in runs[0].items() if isinstance(value, float)]
    return {**runs[0], **{key: statistics.median(run[key] for run in runs) for key in numbers}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--case', help='internal: run one case (JSON) and print its result')
    parser.add_argument('--batch', type=int, nargs='+', default=[128, 512])
    parser.add_argument('--pairs', type=int, default=20_000)
    parser.add_argument('--shard_size', type=int, default=1000)
    parser.add_argument('--steps', type=int, default=40, help='timed batches per case')
    parser.add_argument('--threads', type=int, nargs='+', default=[1, 4], help="the streaming reader's threads")
    parser.add_argument('--cache', nargs='+', default=['warm', 'cold'], choices=['warm', 'cold'])
    parser.add_argument('--repeats', type=int, default=3, help='processes per case; the table shows medians')
    parser.add_argument('--timeout', type=float, default=600, help='seconds a case may take')
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    readers = ['load', *(f'pread x{t}{hints}' for hints in ('', ', no hints') for t in args.threads), 'mmap']
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        build(pathlib.Path(tmp), args.pairs, args.shard_size)
        size = sum(f.stat().st_size for f in (pathlib.Path(tmp) / 'store').iterdir()) / MIB
        print(f'store: {args.pairs:,} pairs of 32x32x3 bfloat16 in shards of {args.shard_size:,}, {size:,.0f} MiB, '
              f'written in {time.perf_counter() - started:.1f} s', flush=True)
        for batch in args.batch:
            for cache in args.cache:
                for reader in readers:
                    case = {'root': tmp, 'reader': reader, 'batch': batch, 'cache': cache, 'steps': args.steps}
                    runs = [measure.run_isolated(__file__, case, args.timeout) for _ in range(args.repeats)]
                    row = next((run for run in runs if 'error' in run), None) or median(runs)
                    rows.append(row)
                    print(measure.table([row], COLUMNS).splitlines()[-1], flush=True)
    print(f'\ncoupling store readers, {args.pairs:,} pairs in shards of {args.shard_size:,}, '
          f'{os.cpu_count()} CPU cores:')
    print(measure.table(rows, COLUMNS))


if __name__ == '__main__':
    main()
