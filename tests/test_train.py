"""The training loop: device-count independence, resume, EMA rule, export."""

import json

import jax
import numpy as np
import pytest

from flowjax import checkpoint, models, sharding, train
from flowjax.data import toy2d
from flowjax.methods import Context, rf


def _run(config, workdir, devices=None):
    mesh = sharding.data_mesh(devices)
    module = models.build(config.model)
    ctx = Context(apply=models.apply_fn(module), source=toy2d.source_sampler(config.data.source),
                  t_eps=config.flow.t_eps)
    batches = toy2d.make_batches(config.data.target, mesh, config.train.batch_size, config.seed)
    return train.train(config, workdir, module=module, loss_fn=rf.loss_fn, ctx=ctx, batches=batches,
                       sample_shape=(2,), mesh=mesh)


def _losses(workdir):
    return [json.loads(line)['loss'] for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


@pytest.fixture
def config(load_experiment):
    config = load_experiment('toy2d_rf', 'runlocal')
    with config.unlocked():
        config.train.batch_size = 64
        config.train.log_every = 1
    return config


def test_one_step_same_on_1_and_8_devices(config, tmp_path):
    assert jax.device_count() == 8
    with config.unlocked():
        config.train.steps = 1
    one = _run(config, tmp_path / 'one', jax.devices()[:1])
    eight = _run(config, tmp_path / 'eight')
    np.testing.assert_allclose(_losses(tmp_path / 'one'), _losses(tmp_path / 'eight'), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # The step changed the parameters, so the comparison above is not vacuous.
    init = jax.tree.leaves(models.build(config.model).init(
        jax.random.fold_in(jax.random.key(config.seed), 0), np.zeros((1, 2), np.float32), np.zeros((1,), np.float32)))
    assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-6 for a, b in zip(jax.tree.leaves(one.params), init))


def test_stop_and_resume_equals_uninterrupted(config, tmp_path):
    with config.unlocked():
        config.train.steps = 12
        config.train.checkpoint_every = 100  # only the final step of each run is saved
    full = _run(config, tmp_path / 'full')
    with config.unlocked():
        config.train.steps = 5
    _run(config, tmp_path / 'split')
    with config.unlocked():
        config.train.steps = 12
    resumed = _run(config, tmp_path / 'split')
    assert int(resumed.step) == 12
    for a, b in zip(jax.tree.leaves((full.params, full.ema_params, full.opt_state)),
                    jax.tree.leaves((resumed.params, resumed.ema_params, resumed.opt_state))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    steps = [json.loads(line)['step'] for line in (tmp_path / 'split' / 'metrics.jsonl').read_text().splitlines()]
    assert steps == list(range(1, 13))


def test_completed_run_is_not_retrained_and_export_loads(config, tmp_path):
    state = _run(config, tmp_path)
    assert checkpoint.is_exported(tmp_path)
    again = _run(config, tmp_path)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(again.params)):
        np.testing.assert_array_equal(a, b)
    params, meta = checkpoint.load_export(tmp_path / 'export')
    assert meta['model']['name'] == 'mlp' and meta['sample_shape'] == [2]
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.ema_params)):
        np.testing.assert_array_equal(a, b)


def test_ema_warmup_rule():
    decay = [float(train.ema_decay(0.999, np.int32(n))) for n in (0, 1, 10, 10_000)]
    assert decay == pytest.approx([0.1, 2 / 11, 11 / 20, 0.999])


def test_workdir_of_another_experiment_is_refused(config, tmp_path):
    with config.unlocked():
        config.train.steps = 2
    _run(config, tmp_path)
    with config.unlocked():
        config.model.features = (16,)
    with pytest.raises(Exception, match='different experiment'):
        _run(config, tmp_path)
