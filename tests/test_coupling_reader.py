"""The streaming coupling reader (`Store.columns`): bounded host memory, the full-load reader's batches
bit for bit, old stores, damaged shards and reads from several threads."""

import concurrent.futures
import io
import os
import tracemalloc
import zipfile

import numpy as np
import pytest

from flowjax import errors
from flowjax.data import couplings, stream

IMAGE = (32, 32, 3)
MIB = 2 ** 20
BUDGET = 8 * MIB  # host memory the streaming reader may use for the 40 MB store at batch 64
SPLITS = ((0, 1), (1, 2), (3, 4))  # (process_index, process_count)


def _store(path, n: int, shard_size: int, shape=IMAGE, dtype: str = 'float32', labels: bool = True,
           seed: int = 0) -> couplings.Store:
    """A complete store of random pairs, written as the generate stage writes one."""
    path.mkdir(parents=True)
    couplings.write_manifest(path, {'version': couplings.FORMAT_VERSION, 'num_pairs': n, 'shard_size': shard_size,
                                    'dtype': dtype, 'shape': list(shape), 'num_classes': 10 if labels else 0,
                                    'complete': True})
    rng = np.random.default_rng(seed)
    for k in range(couplings.num_shards(n, shard_size)):
        lo, hi = couplings.shard_range(k, n, shard_size)
        arrays = {'x0': rng.standard_normal((hi - lo, *shape), np.float32),
                  'x1': rng.random((hi - lo, *shape), np.float32), 'index': np.arange(lo, hi),
                  'nfe': rng.integers(2, 9, hi - lo).astype(np.int32)}
        if labels:
            arrays['label'] = rng.integers(0, 10, hi - lo).astype(np.int32)
        couplings.write_shard(path, k, arrays, dtype)
    return couplings.open_store(path)


@pytest.fixture(scope='module')
def big(tmp_path_factory):
    """1,750 float32 32x32x3 pairs with labels (41 MiB of pairs, five budgets) in shards of 250."""
    return _store(tmp_path_factory.mktemp('big') / 'store', 1750, 250)


def _same(got: dict, want: dict, where: str) -> None:
    assert got.keys() == want.keys(), where
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, (where, name)
        assert got[name].tobytes() == want[name].tobytes(), (where, name)


def _epochs(n: int, batch: int, count: float = 1.5) -> range:
    return range(int(count * n / batch) + 1)


ANNEAL = {'beta': lambda step: 1 - step / 100}


def test_streaming_reader_stays_within_a_memory_budget(big):
    """1.5 epochs at batch 64 with flips: the traced peak stays under 8 MiB (the full load needs 80)."""
    assert big.num_pairs * 2 * np.prod(IMAGE) * 4 > 5 * BUDGET
    store = couplings.open_store(big.path)
    tracemalloc.start()
    try:
        reader = couplings.CouplingBatches(store.columns(), 64, seed=1, flip=True, per_step=ANNEAL,
                                           process_index=0, process_count=1)
        for step in _epochs(store.num_pairs, 64):
            batch = reader.local_batch(step)
            assert batch['x0'].shape == (64, *IMAGE)
        del batch
        streaming = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        couplings.CouplingBatches(couplings.open_store(big.path).load(), 64, seed=1).local_batch(0)
        full = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert streaming < BUDGET < full, (streaming / MIB, full / MIB)


def test_streaming_batches_equal_the_full_load_ones(big):
    """Every step of 1.5 epochs, flips, labels and per-step fields, for several process splits."""
    columns, arrays = big.columns(), couplings.open_store(big.path).load()
    for index, count in SPLITS:
        new, old = (couplings.CouplingBatches(data, 32, seed=4, flip=True, per_step=ANNEAL, process_index=index,
                                              process_count=count) for data in (columns, arrays))
        for step in _epochs(big.num_pairs, 32):
            _same(new.local_batch(step), old.local_batch(step), f'step {step}, process {index} of {count}')


def test_streaming_mixed_batches_equal_the_full_load_ones(big, tmp_path):
    second = _store(tmp_path / 'second', 90, 40, seed=7)
    main = (big.columns(), couplings.open_store(big.path).load())
    other = (second.columns(), couplings.open_store(second.path).load())
    for index, count in SPLITS:
        new, old = (couplings.MixedCouplingBatches(m, o, 32, 12, seed=2, process_index=index, process_count=count)
                    for m, o in zip(main, other))
        for step in _epochs(big.num_pairs, 20):  # 1.5 epochs of the main store, 16 of the second
            _same(new.local_batch(step), old.local_batch(step), f'step {step}, process {index} of {count}')


@pytest.mark.parametrize('dtype, labels', [('bfloat16', True), ('float16', True), ('float32', False)])
def test_16_bit_and_unlabelled_stores(tmp_path, dtype, labels):
    """Short last shards too; columns read what `load` gives (the storage dtype) for any row order."""
    store = _store(tmp_path / 'store', 300, 64, shape=(8, 8, 3), dtype=dtype, labels=labels)
    columns, arrays = store.columns(), couplings.open_store(store.path).load()
    assert columns.keys() == arrays.keys() == {'x0', 'x1', 'index', 'nfe'} | ({'label'} if labels else set())
    ids = np.random.default_rng(0).integers(0, 300, 500)  # repeats, every shard, any order
    for name, column in columns.items():
        assert len(column) == 300 and column.shape == arrays[name].shape and column.dtype == arrays[name].dtype
        _same({name: column[ids]}, {name: arrays[name][ids]}, name)
        _same({name: column[np.arange(300)]}, {name: arrays[name]}, name)  # one read per shard
        assert column[np.zeros(0, np.int64)].shape == (0, *arrays[name].shape[1:])
    for index, count in SPLITS:
        new, old = (couplings.CouplingBatches(data, 24, seed=0, flip=True, per_step=ANNEAL, process_index=index,
                                              process_count=count) for data in (columns, arrays))
        for step in _epochs(300, 24, 2):
            _same(new.local_batch(step), old.local_batch(step), f'step {step}')
    with pytest.raises(IndexError):
        columns['x0'][np.array([0, 300])]
    with pytest.raises(TypeError):
        columns['x0'][np.zeros((2, 2), np.int64)]


def test_reads_from_several_threads_give_the_same_batches(big, monkeypatch):
    """The read-ahead thread, a pool of readers, and descriptors evicted while other threads read."""
    arrays = couplings.open_store(big.path).load()
    old = couplings.CouplingBatches(arrays, 48, seed=3, flip=True, process_index=0, process_count=1)
    steps = list(_epochs(big.num_pairs, 48))
    want = [old.local_batch(step) for step in steps]
    monkeypatch.setattr(couplings, 'OPEN_FILES', 2)  # 7 shards, 2 open at a time: evictions mid-read
    for threads in (1, 3):
        store = couplings.open_store(big.path)
        reader = couplings.CouplingBatches(store.columns(threads=threads), 48, seed=3, flip=True,
                                           process_index=0, process_count=1)
        for step, got in zip(steps, stream.read_ahead(reader.local_batch, steps, 3)):
            _same(got, want[step], f'read ahead, step {step}')
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for step, got in zip(steps * 2, pool.map(reader.local_batch, steps * 2)):
                _same(got, want[step], f'{threads} threads, step {step}')
        files = store.columns()['x0']._files
        assert len(files._open) <= 2 and all(handle.users == 0 for handle in files._open.values())


def test_stores_on_other_file_systems_read_with_seek_and_read(big, monkeypatch):
    """A bucket path's files are opened per read task and read in a pool of threads (here: local files)."""
    monkeypatch.setattr(couplings, '_is_local', lambda path: False)
    store = couplings.open_store(big.path)
    columns = store.columns()
    assert columns['x0']._pool is not None and not columns['x0']._files.hints
    ids = np.random.default_rng(1).permutation(big.num_pairs)[:300]
    for name, column in columns.items():
        _same({name: column[ids]}, {name: couplings.open_store(big.path).load()[name][ids]}, name)


def _rewrite(file, **replace) -> None:
    """Shard `file` written again with some members replaced (np.savez, uncompressed)."""
    with np.load(file) as npz:
        arrays = {name: npz[name] for name in npz.files}
    buffer = io.BytesIO()
    np.savez(buffer, **{**arrays, **replace})
    file.write_bytes(buffer.getvalue())


def _refused(store_path, *fragments) -> str:
    with pytest.raises(errors.UserError) as excinfo:
        couplings.open_store(store_path).columns()
    message = str(excinfo.value)
    assert '\n' not in message and all(f in message for f in fragments), message
    return message


@pytest.mark.parametrize('damage, fragments', [
    ('truncate', ['truncated or corrupted', 'BadZipFile']),
    ('garbage', ['truncated or corrupted']),
    ('wrong_rows', ['index is not 10..19']),
    ('short_x1', ['x1 has shape (9, 2), expected (10, 2)']),
    ('missing_nfe', ['truncated or corrupted', 'nfe not in the archive']),
    ('float64_x0', ['x0 has dtype float64, expected float32']),
    ('int64_label', ['members', "'label': 'int64'", "'label': 'int32'"]),
])
def test_damaged_shard_is_refused_at_open_in_one_line(tmp_path, damage, fragments):
    store = _store(tmp_path / 'store', 30, 10, shape=(2,))
    bad = tmp_path / 'store' / 'shard-000001.npz'
    with np.load(bad) as npz:
        x0, x1, label = npz['x0'], npz['x1'], npz['label']
    if damage == 'truncate':
        bad.write_bytes(bad.read_bytes()[:-100])
    elif damage == 'garbage':
        bad.write_bytes(b'not a zip file at all')
    elif damage == 'wrong_rows':
        bad.write_bytes((tmp_path / 'store' / 'shard-000002.npz').read_bytes())
    elif damage == 'short_x1':
        _rewrite(bad, x1=x1[:9])
    elif damage == 'missing_nfe':
        with np.load(bad) as npz:
            arrays = {name: npz[name] for name in npz.files if name != 'nfe'}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        bad.write_bytes(buffer.getvalue())
    elif damage == 'float64_x0':
        _rewrite(bad, x0=x0.astype(np.float64))
    else:
        _rewrite(bad, label=label.astype(np.int64))
    assert 'shard-000001.npz' in _refused(store.path, *fragments, 'rerun the generate stage')


@pytest.mark.parametrize('layout', ['compressed', 'fortran'])
def test_shards_the_reader_cannot_read_in_place_are_refused(tmp_path, layout):
    """np.load reads them (so `load` does); reading rows in place needs np.savez's stored C-order members."""
    store = _store(tmp_path / 'store', 30, 10, shape=(2,))
    bad = tmp_path / 'store' / 'shard-000002.npz'
    if layout == 'compressed':
        with np.load(bad) as npz:
            arrays = {name: npz[name] for name in npz.files}
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        bad.write_bytes(buffer.getvalue())
    else:
        with np.load(bad) as npz:
            _rewrite(bad, x1=np.asfortranarray(npz['x1']))
    assert couplings.open_store(store.path).load()['x1'].shape == (30, 2)
    _refused(store.path, 'shard-000002.npz', 'x0' if layout == 'compressed' else 'x1',
             'is compressed' if layout == 'compressed' else 'Fortran order', 'regenerate the store')


def test_a_shard_truncated_after_open_is_named_when_read(tmp_path):
    store = _store(tmp_path / 'store', 30, 10, shape=(2,))
    columns, want = store.columns(), store.load()['x0']
    bad = tmp_path / 'store' / 'shard-000002.npz'
    with zipfile.ZipFile(bad) as archive:
        end = archive.getinfo('x0.npy').header_offset + 200  # x0's header and its first rows
    os.truncate(bad, end)
    _same({'x0': columns['x0'][np.arange(21)]}, {'x0': want[:21]}, 'rows before the cut')
    with pytest.raises(errors.UserError) as excinfo:
        columns['x0'][np.array([3, 29])]
    message = str(excinfo.value)
    assert '\n' not in message and 'shard-000002.npz' in message and 'truncated or corrupted' in message


def test_make_batches_reads_the_store_streaming(tmp_path, monkeypatch):
    """Training never loads a whole store (`Store.load` is not called)."""
    from flowjax import sharding

    store = _store(tmp_path / 'store', 64, 16, shape=(4, 4, 1))
    want = couplings.CouplingBatches(store.load(), 16, seed=1, flip=True)
    monkeypatch.setattr(couplings.Store, 'load', lambda self: pytest.fail('the whole store was loaded'))
    batches = couplings.make_batches(tmp_path / 'store', sharding.data_mesh(), 16, seed=1, flip=True)
    for step in (0, 5):
        _same({name: np.asarray(value) for name, value in batches(step).items()}, want.local_batch(step), 'batch')
    mixed = couplings.make_mixed_batches(tmp_path / 'store', tmp_path / 'store', 8, sharding.data_mesh(), 16, seed=1)
    assert mixed(2)['x0'].shape == (16, 4, 4, 1)
