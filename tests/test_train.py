"""The training loop: device-count independence, resume, EMA rule, export."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from flowjax import checkpoint, errors, models, sharding, train
from flowjax.data import stream, toy2d
from flowjax.flows import objective
from flowjax.methods import rf
from flowjax.methods.training import Context
from flowjax.models import kinds


def _run(config, workdir, devices=None):
    mesh = sharding.data_mesh(devices)
    kind = kinds.from_config(config)
    ctx = Context(apply=kind.apply, source=toy2d.source_sampler(config.data.source),
                  flow=objective.Flow(t_eps=config.flow.t_eps))
    batches = toy2d.make_batches(config.data.target, mesh, config.train.batch_size, config.seed)
    return train.train(config, workdir, kind=kind, loss_fn=rf.loss_fn, ctx=ctx, batches=batches,
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


@pytest.mark.parametrize('weight_decay', [0.0, 1e-2])
def test_weight_decay_chooses_adam_or_adamw(config, weight_decay):
    """train.weight_decay 0: the very Adam of before; > 0: optax.adamw with that decay, same schedule."""
    with config.unlocked():
        config.train.update(weight_decay=weight_decay, grad_clip=0.0, warmup_steps=2)
    tx, schedule = train.optimizer(config.train)
    cfg = config.train
    if weight_decay:
        want = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps, weight_decay=weight_decay)
    else:
        want = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps)
    params = {'w': jax.random.normal(jax.random.key(0), (3, 4)), 'b': jnp.ones((4,))}
    states, (a, b) = (tx.init(params), want.init(params)), (params, params)
    for step in range(3):
        grads = jax.tree.map(lambda p: jnp.sin(p + step), a)
        (ua, sa), (ub, sb) = tx.update(grads, states[0], a), want.update(grads, states[1], b)
        states, a, b = (sa, sb), optax.apply_updates(a, ua), optax.apply_updates(b, ub)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y)
    # the decay's own part: AdamW's update minus Adam's is -rate * weight_decay * params
    adam = optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps)
    grads = jax.tree.map(jnp.cos, params)
    plain, _ = adam.update(grads, adam.init(params), params)
    ours, _ = tx.update(grads, tx.init(params), params)
    for u, v, p in zip(jax.tree.leaves(ours), jax.tree.leaves(plain), jax.tree.leaves(params)):
        np.testing.assert_allclose(u - v, -schedule(0) * weight_decay * p, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize('value', [-1e-5, float('nan'), float('inf')])
def test_bad_weight_decay_is_one_line(config, value):
    with config.unlocked():
        config.train.weight_decay = value
    with pytest.raises(errors.ConfigError) as e:
        train.validate(config.train, sharding.data_mesh())
    assert str(e.value) == f'train.weight_decay={value!r}: must be a number >= 0 (0: Adam; > 0: AdamW)'


def test_workdir_of_another_experiment_is_refused(config, tmp_path):
    with config.unlocked():
        config.train.steps = 2
    _run(config, tmp_path)
    with config.unlocked():
        config.model.features = (16,)
    with pytest.raises(Exception, match='different experiment'):
        _run(config, tmp_path)


def test_scanned_steps_equal_single_steps(config, tmp_path):
    """n_jitted_steps = 4 runs the same steps as 1 (one lax.scan a jit call), logs every step."""
    with config.unlocked():
        config.train.steps = 10
        config.train.log_every = 4
        config.train.checkpoint_every = 8
    single = _run(config, tmp_path / 'single')
    with config.unlocked():
        config.train.n_jitted_steps = 4  # chunks [0, 4), [4, 8), [8, 10): the last one is shorter
    scanned = _run(config, tmp_path / 'scanned')
    for a, b in zip(jax.tree.leaves((single.params, single.ema_params)),
                    jax.tree.leaves((scanned.params, scanned.ema_params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_losses(tmp_path / 'single'), _losses(tmp_path / 'scanned'), rtol=1e-5)
    assert checkpoint.Checkpoints(tmp_path / 'scanned', config).latest_step() == 10


def test_speed_options_may_change_on_resume(config, tmp_path):
    with config.unlocked():
        config.train.steps = 4
        config.train.checkpoint_every = 2
    _run(config, tmp_path)
    with config.unlocked():
        config.train.steps = 8
        config.train.n_jitted_steps = 2
        config.train.log_every = 2
        config.train.remat = 'full'
        config.train.prefetch = 0
    assert int(_run(config, tmp_path).step) == 8


@pytest.mark.parametrize('remat', ['dots', 'full'])
def test_remat_keeps_loss_and_gradients(load_experiment, remat):
    """Recomputing activations in the backward pass changes memory and time, not the step."""
    config = load_experiment('digits_reflow', 'runlocal')
    # The runlocal U-Net (one resolution, 8x8) with attention added: convolutions, GroupNorm, attention, all
    # that remat touches, and no second resolution (XLA's CPU compiler is slow on remat'd conv backwards).
    module = models.build(ml_collections.ConfigDict({**config.teacher.model.to_dict(), 'ch_mult': (1,),
                                                     'attn_resolutions': (8,)}))
    ctx = Context(apply=models.apply_fn(module), source=lambda key, shape: jax.random.normal(key, shape),
                  flow=objective.Flow())
    x1 = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
    params = module.init(jax.random.key(0), x1, np.zeros((4,), np.float32))
    tx, schedule = train.optimizer(config.teacher.train)
    rng = jax.random.key(2)
    state = train.TrainState(step=np.int32(0), params=params, ema_params=params, opt_state=tx.init(params))
    outs = [jax.jit(train.make_train_step(rf.loss_fn, tx, schedule, 0.99, rng, r))(state, {'x1': x1}, ctx)
            for r in ('none', remat)]
    (a, ma), (b, mb) = outs
    np.testing.assert_allclose(ma['loss'], mb['loss'], rtol=1e-5)
    np.testing.assert_allclose(ma['grad_norm'], mb['grad_norm'], rtol=1e-4)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_chunks_end_on_multiples():
    assert train.chunks(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert train.chunks(6, 13, 4) == [(6, 8), (8, 12), (12, 13)]
    assert train.chunks(0, 3, 1) == [(0, 1), (1, 2), (2, 3)]
    assert train.chunks(5, 5, 2) == []


@pytest.mark.parametrize('field, value, expected', [
    ('n_jitted_steps', 0, 'train.n_jitted_steps=0: must be an integer >= 1'),
    ('log_every', 3, 'train.log_every=3: must be a multiple of train.n_jitted_steps=2'),
    ('checkpoint_every', 5, 'train.checkpoint_every=5: must be a multiple of train.n_jitted_steps=2'),
    ('remat', 'some', "train.remat='some': expected one of none, dots, full"),
    ('prefetch', -1, 'train.prefetch=-1: must be an integer >= 0'),
])
def test_bad_speed_options_are_one_line(config, field, value, expected):
    with config.unlocked():
        config.train.n_jitted_steps = 2
        config.train.log_every = 2
        config.train.checkpoint_every = 2
        config.train[field] = value
    with pytest.raises(errors.ConfigError) as e:
        train.validate(config.train, sharding.data_mesh())
    assert str(e.value) == expected


def test_read_ahead_keeps_order_and_raises_where_read():
    calls = []

    def read(i):
        calls.append(i)
        if i == 5:
            raise ValueError('bad batch 5')
        return i * i

    for depth in (0, 1, 3):
        assert list(stream.read_ahead(lambda i: i * i, list(range(7)), depth)) == [i * i for i in range(7)]
    got = []
    with pytest.raises(ValueError, match='bad batch 5'):
        for value in stream.read_ahead(read, list(range(8)), 2):
            got.append(value)
    assert got == [0, 1, 4, 9, 16]
