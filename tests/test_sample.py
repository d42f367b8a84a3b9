"""Method 'sample' (docs/methods.md, Sample job): samples.npz of every model kind, the same on 1 or 8 devices and
split over processes, resumable after a stop, refusing another job's workdir; class labels and guidance; the
experiment file's runlocal variant end to end. Bad values of its fields: tests/test_bad_input.py."""

import logging
import os
import signal

import jax
import numpy as np
import pytest

from conftest import experiment_config, random_export
import flowjax
from flowjax import checkpoint, configs, errors, pipeline, train
from flowjax.methods import caf, ddpm, perflow, sample, table

MLP = {'name': 'mlp', 'features': (16,), 'time_dim': 8, 'dropout': 0.0}


def _export(path, config, kind) -> str:
    """An export of `kind` (a toy 2-D model) at small random weights."""
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: (0.3 * rng.standard_normal(leaf.shape)).astype(leaf.dtype),
                          jax.eval_shape(lambda key: kind.init(key, (2,)), jax.random.key(0)))
    checkpoint.export(path, params, train.export_meta(config, kind, (2,), 0))
    return str(path)


def _config(path, **fields):
    c = table.config('sample')
    c.sample.update({'checkpoint': str(path), 'count': 50, 'batch_size': 8, 'sampler': 'heun@3', **fields})
    return c


@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    teacher = experiment_config('toy2d_rf', 'runlocal')
    teacher.model.update(MLP)
    return random_export(teacher, tmp_path_factory.mktemp('toy') / 'teacher')


def _files(root) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), 'rb').read()
            for d, _, files in os.walk(root) for f in files}


def _points(workdir) -> np.ndarray:
    with np.load(workdir / 'samples.npz') as z:
        assert z.files == ['points']
        return z['points']


def test_toy_samples_match_any_split_and_refuse_another_job(toy, tmp_path):
    out = sample.sample(_config(toy), tmp_path / 'a')  # 8 devices, one process
    assert out['complete'] and out['chunks'] == 7 and out['new_chunks'] == 7 and out['mean_nfe'] == 6.0
    full = _points(tmp_path / 'a')
    assert full.shape == (50, 2) and full.dtype == np.float32 and np.isfinite(full).all()
    assert len(np.unique(full, axis=0)) == 50
    assert (tmp_path / 'a' / 'samples.png').exists()
    # two processes of 4 and 1 devices, one after the other: process 0 writes chunks 0, 2, 4, 6, process 1 the rest,
    # and a rerun of process 0 assembles; the samples are the 8-device run's (sample i depends on (seed, i)), to the
    # last bit where the rows per device differ (on some CPUs XLA's matmul kernels round them by shape)
    devices = jax.local_devices()
    split = dict(process_count=2, devices=devices[:4], process_index=0)
    first = sample.sample(_config(toy), tmp_path / 'b', **split)
    assert first['new_chunks'] == 4 and not first['complete'] and not (tmp_path / 'b' / 'samples.npz').exists()
    assert sample.present_chunks(tmp_path / 'b' / 'parts', 7) == [0, 2, 4, 6]
    second = sample.sample(_config(toy), tmp_path / 'b', **{**split, 'devices': devices[:1], 'process_index': 1})
    assert second['new_chunks'] == 3 and not second['complete']
    assert sample.sample(_config(toy), tmp_path / 'b', **split)['complete']
    np.testing.assert_allclose(_points(tmp_path / 'b'), full, rtol=0, atol=1e-6)
    # another batch size gives the same samples too; with the same rows per device (1), the same bits
    sample.sample(_config(toy, batch_size=16), tmp_path / 'c')
    np.testing.assert_allclose(_points(tmp_path / 'c'), full, rtol=0, atol=1e-6)
    sample.sample(_config(toy, batch_size=1), tmp_path / 'e', devices=devices[:1])
    np.testing.assert_array_equal(_points(tmp_path / 'e'), full)

    before = _files(tmp_path / 'a')
    assert sample.sample(_config(toy), tmp_path / 'a')['new_chunks'] == 0  # finished: skipped
    for field, value in (('seed', 1), ('count', 60), ('sampler', 'euler@2')):
        with pytest.raises(errors.UserError, match=f"holds samples made with {field}=.* but this run asks for"):
            sample.sample(_config(toy, **{field: value}), tmp_path / 'a')
    assert _files(tmp_path / 'a') == before
    (tmp_path / 'd').mkdir()
    (tmp_path / 'd' / 'samples.npz').write_bytes(b'someone else\'s')
    with pytest.raises(errors.UserError, match='samples.npz: exists but .*manifest.json, what made it, does not'):
        sample.sample(_config(toy), tmp_path / 'd')


def test_a_stop_keeps_the_chunks_written_and_a_rerun_resumes(toy, tmp_path, monkeypatch):
    sample.sample(_config(toy), tmp_path / 'full')
    write = sample._write_atomic

    def write_then_interrupt(target, data):
        write(target, data)
        if target.name == 'chunk-000001.npz':
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(sample, '_write_atomic', write_then_interrupt)
    with pytest.raises(errors.Preempted) as e:
        sample.sample(_config(toy), tmp_path / 'split')
    assert e.value.signum == signal.SIGINT and signal.getsignal(signal.SIGINT) is previous
    parts = tmp_path / 'split' / 'parts'
    assert str(e.value) == f'interrupted in the sample job; 2 of 7 chunks saved in {parts}; rerun the same command to resume'
    assert sample.present_chunks(parts, 7) == [0, 1] and not (tmp_path / 'split' / 'samples.npz').exists()
    kept = _files(parts)
    stray = parts / 'chunk-000002.npz.tmp-0123abcd'  # a write a kill cut short
    stray.write_bytes(b'PK\x03\x04 half a chunk')
    monkeypatch.setattr(sample, '_write_atomic', write)
    assert sample.sample(_config(toy), tmp_path / 'split')['new_chunks'] == 5
    assert not stray.exists()
    assert all(_files(parts)[name] == data for name, data in kept.items() if name != 'manifest.json')
    np.testing.assert_array_equal(_points(tmp_path / 'split'), _points(tmp_path / 'full'))


def _kinds():
    c = table.config('caf')
    c.model.update(MLP)
    yield 'caf', c, caf.kind_of(c), 'caf@2'
    c = table.config('perflow')
    c.model.update(MLP)
    yield 'piecewise', c, perflow.kind_of(c), 'euler@4'
    c = table.config('ddpm')
    c.model.update(MLP)
    c.ddpm.timesteps = 10
    yield 'ddpm', c, ddpm.kind_of(c), 'ddim@2'


KINDS = list(_kinds())


@pytest.mark.parametrize('name, config, kind, spec', KINDS, ids=[k[0] for k in KINDS])
def test_every_model_kind(name, config, kind, spec, tmp_path):
    path = _export(tmp_path / 'model', config, kind)
    out = sample.sample(_config(path, count=12, sampler=spec), tmp_path / 'run')
    points = _points(tmp_path / 'run')
    assert points.shape == (12, 2) and np.isfinite(points).all() and out['complete']
    manifest = sample.read_manifest(tmp_path / 'run' / 'parts')
    assert manifest['kind'] == name and manifest['sampler'] == spec and manifest['labels'] is None
    other = 'caf@2' if name != 'caf' else 'ddim@2'
    with pytest.raises(errors.UserError, match=f"sample.sampler='{other}': does not apply to .* kind '{name}'"):
        sample.sample(_config(path, sampler=other), tmp_path / 'other')


def test_class_labels_guidance_and_the_runlocal_experiment(tmp_path, caplog):
    teacher = experiment_config('fireflow_digits', 'runlocal').teacher_s0  # class-conditional, label dropout 0.1
    path = random_export(teacher, tmp_path / 'digits')
    caplog.set_level(logging.INFO)
    config = experiment_config('sample', f'runlocal,checkpoint={path},count=20')
    config.sample.update(batch_size=16, labels=(3, 5), guidance=2.0)
    out = table.METHODS['sample'].run(config, str(tmp_path / 'run'))
    assert out['complete'] and out['mean_nfe'] == 8.0  # euler@4, guided: two network calls a step
    assert 'sample euler@4: 20/20 (100%), ' in caplog.text and ' samples/s, ETA 0:00' in caplog.text
    with np.load(tmp_path / 'run' / 'samples.npz') as z:
        assert z.files == ['images', 'labels']
        images, labels = z['images'], z['labels']
    assert images.shape == (20, 8, 8, 1) and images.dtype == np.uint8 and images.max() > images.min()
    np.testing.assert_array_equal(labels, np.tile([3, 5], 10))
    assert (tmp_path / 'run' / 'samples.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    config.sample.update(labels='uniform', grid=0)
    sample.sample(config, tmp_path / 'uniform')
    with np.load(tmp_path / 'uniform' / 'samples.npz') as z:
        drawn = z['labels']
    assert drawn.min() >= 0 and drawn.max() <= 9 and len(set(drawn.tolist())) > 3
    # the Python API draws the same starts and labels: flowjax.load(...).sample gives the job's samples
    model = flowjax.load(path)
    np.testing.assert_array_equal(model.draw_labels(20, seed=config.sample.seed), drawn)
    with np.load(tmp_path / 'uniform' / 'samples.npz') as z:
        job_images = z['images'].astype(np.int32)
    api_images = flowjax.to_uint8(model.sample(20, 'euler@4', seed=config.sample.seed, guidance=2.0))
    assert np.abs(api_images.astype(np.int32) - job_images).max() <= 1  # batched vs per-example convolutions
    assert not (tmp_path / 'uniform' / 'samples.png').exists()
    config.sample.labels = 12
    with pytest.raises(errors.UserError, match=r'sample.labels=12: class 12 is not a class .*num_classes=10'):
        sample.sample(config, tmp_path / 'bad')

    # in a pipeline, sample.checkpoint names the stage that trains the model
    stage = table.for_method(teacher, 'sample')
    stage.sample.update(checkpoint='teacher', count=8, batch_size=8)
    teacher.checkpoint = path
    plan = pipeline.plan(configs.pipeline(teacher=teacher, samples=stage), str(tmp_path / 'pipe'))
    assert plan.configs['samples'].sample.checkpoint == path
