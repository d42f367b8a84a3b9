"""Failures: non-finite steps, SIGTERM / Ctrl-C (preemption), kill -9 at any moment, older checkpoints."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, experiment_config
from flowjax import checkpoint, errors, generate, models, sharding, train
from flowjax.data import couplings, toy2d
from flowjax.flows import objective
from flowjax.methods import rf, table
from flowjax.methods.training import Context
from flowjax.models import kinds
from test_generate import _assert_same, _export_teacher, _stored
from test_main import _main, _one_line_error

ENV = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')


def _config(**train_fields):
    """The runlocal toy 1-RF config: 12 steps, two a jit call, logs and checkpoints every 4."""
    config = experiment_config('toy2d_rf', 'runlocal')
    config.train.update(steps=12, batch_size=64, log_every=4, checkpoint_every=4, n_jitted_steps=2, **train_fields)
    config.lock()
    return config


def _train(config, workdir, *, poison=None, on_read=None):
    """train.train on the toy data; batch `poison` (a 0-based step) is NaN, `on_read(step)` runs as a batch is read."""
    mesh = sharding.data_mesh()
    kind = kinds.from_config(config)
    ctx = Context(apply=kind.apply, source=toy2d.source_sampler(config.data.source),
                  flow=objective.Flow(t_eps=config.flow.t_eps))
    clean = toy2d.make_batches(config.data.target, mesh, config.train.batch_size, config.seed)

    def batches(step):
        if on_read is not None:
            on_read(step)
        batch = clean(step)
        return {**batch, 'x1': batch['x1'] * np.nan} if step == poison else batch

    return train.train(config, workdir, kind=kind, loss_fn=rf.loss_fn, ctx=ctx, batches=batches,
                       sample_shape=(2,), mesh=mesh)


def _state(state):
    return jax.device_get((state.params, state.ema_params, state.opt_state))


def _assert_identical(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b):
        assert np.array_equal(x, y)


def _logged(workdir):
    return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """(params, ema, opt_state) of the uninterrupted 12-step run."""
    state = _train(_config(), tmp_path_factory.mktemp('reference'))
    assert int(state.step) == 12
    return _state(state)


def test_nonfinite_stop_names_the_step_and_an_older_workdir_resumes(tmp_path, reference):
    config = _config()
    with pytest.raises(errors.UserError) as e:
        _train(config, tmp_path, poison=7)  # step 8: the second step of the jit call (6, 8]
    assert str(e.value) == ("train: loss or gradients not finite at step 8 (loss nan, gradient norm nan); the last "
                            "checkpoint (step 4) is intact; lower train.lr, keep train.grad_clip, or set "
                            "train.nonfinite='skip' to skip such steps")
    ckpt = tmp_path / 'checkpoints'
    assert sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) == [2, 4]  # nothing at or after step 8
    assert [m['step'] for m in _logged(tmp_path)] == [4]

    # What a kill leaves: a save cut short (a half-copied Orbax tmp dir), a metrics line cut short; and a
    # checkpoint written before train.nonfinite existed. The rerun resumes from step 4.
    shutil.copytree(ckpt / '4', ckpt / '8.orbax-checkpoint-tmp')
    (ckpt / '8.orbax-checkpoint-tmp' / 'state' / 'manifest.ocdbt').unlink(missing_ok=True)
    with (tmp_path / 'metrics.jsonl').open('a') as f:
        f.write('{"step": 8, "tim')
    saved = ckpt / '4' / 'config' / 'metadata'
    old = json.loads(saved.read_text())
    del old['train']['nonfinite']
    saved.write_text(json.dumps(old))
    assert checkpoint.config_difference(old, json.loads(config.to_json())) is None

    resumed = _train(config, tmp_path)
    _assert_identical(_state(resumed), reference)  # bit for bit: the stop damaged nothing
    assert [m['step'] for m in _logged(tmp_path)] == [4, 8, 12]
    assert not (ckpt / '8.orbax-checkpoint-tmp').exists()


def test_diverging_run_stops_with_one_line_and_status_2(tmp_path):
    result = _main('--config=experiments/toy2d_rf.py:runlocal', f'--workdir={tmp_path}', '--config.train.lr=1e30',
                   '--config.train.checkpoint_every=2', '--config.train.log_every=2')
    _one_line_error(result, 'train: loss or gradients not finite at step 2', 'the last checkpoint (step 1) is intact',
                    "train.nonfinite='skip'")
    assert [p.name for p in (tmp_path / 'checkpoints').iterdir()] == ['1']
    assert (tmp_path / 'checkpoints' / '1' / 'commit_success.txt').exists()


def test_config_difference_reads_a_missing_field_as_its_default():
    method = table.METHODS['reflow']
    defaults = method.default_identity()
    current = method.identity(table.config('reflow'))
    saved = json.loads(table.config('reflow').to_json())
    del saved['train']['b2'], saved['reflow']['online_sampler']  # fields newer than the checkpoint
    saved['distill'] = {'k': 3}  # another method's section (older checkpoints held every section)
    assert checkpoint.config_difference(saved, current, defaults) is None
    current['train']['b2'] = 0.95  # not the default, so not what the older run did
    assert checkpoint.config_difference(saved, current, defaults) == 'train.b2'
    current['train']['b2'] = saved['train']['b1'] = 0.5
    assert checkpoint.config_difference(saved, current, defaults) == 'train.b1'  # present fields still compare
    assert 'train.nonfinite' in checkpoint.RESUMABLE_CHANGES


def test_nonfinite_skip_goes_on_and_counts(tmp_path, caplog):
    config = _config(nonfinite='skip')
    state = _train(config, tmp_path, poison=5)  # step 6
    assert int(state.step) == 12
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_state(state)))
    logged = _logged(tmp_path)
    assert [(m['step'], m['nonfinite']) for m in logged] == [(4, 0), (8, 1), (12, 0)]
    assert all(np.isfinite(m['loss']) for m in logged)  # the skipped step is left out of the mean
    assert 'skipped 1 of the steps 5..8 (loss or gradients not finite), the first at step 6' in caplog.text


def test_a_nonfinite_step_changes_nothing():
    config = _config()
    module = models.build(config.model)
    ctx = Context(apply=models.apply_fn(module), source=toy2d.source_sampler(config.data.source), flow=objective.Flow())
    params = module.init(jax.random.key(0), np.zeros((1, 2), np.float32), np.zeros((1,), np.float32))
    tx, schedule = train.optimizer(config.train)
    state = train.TrainState(step=np.int32(3), params=params, ema_params=jax.tree.map(lambda p: p + 1, params),
                             opt_state=tx.init(params))
    step = jax.jit(train.make_train_step(rf.loss_fn, tx, schedule, 0.9, jax.random.key(1)))
    x1 = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
    x1[3, 1] = np.inf
    bad, metrics = step(state, {'x1': x1}, ctx)
    assert int(bad.step) == 4 and float(metrics['nonfinite']) == 1.0
    _assert_identical(_state(bad), _state(state))
    x1[3, 1] = 0.0
    good, metrics = step(state, {'x1': x1}, ctx)
    assert float(metrics['nonfinite']) == 0.0
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(good.params), jax.tree.leaves(state.params)))


def test_bad_nonfinite_value_is_one_line():
    config = _config()
    with config.unlocked():
        config.train.nonfinite = 'ignore'
    with pytest.raises(errors.ConfigError) as e:
        train.validate(config.train, sharding.data_mesh())
    assert str(e.value) == "train.nonfinite='ignore': expected one of stop, skip"


def test_sigterm_saves_the_step_and_resumes_bit_identical(tmp_path, reference):
    previous = signal.getsignal(signal.SIGTERM)

    def preempt(step):  # called in the read-ahead thread, up to two jit calls ahead of the devices
        if step == 7:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(errors.Preempted) as e:
        _train(_config(), tmp_path, on_read=preempt)
    assert e.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous  # outside the loop SIGTERM acts as before
    match = re.fullmatch(r'preempted at step (\d+); checkpoint saved in (.+); rerun the same command to resume',
                         str(e.value))
    assert match and match.group(2) == str(tmp_path / 'checkpoints'), str(e.value)
    stopped = int(match.group(1))
    assert stopped in (4, 6, 8)  # the end of a jit call: the one in flight when the handler ran
    assert checkpoint.Checkpoints(tmp_path, _config()).latest_step() == stopped
    assert not (tmp_path / 'export').exists()

    resumed = _train(_config(), tmp_path)
    _assert_identical(_state(resumed), reference)
    assert [m['step'] for m in _logged(tmp_path)] == [4, 8, 12]


def test_ctrl_c_in_the_coupling_pass_stops_after_the_shard(tmp_path, monkeypatch):
    _export_teacher(tmp_path / 'teacher', 0)
    config = table.config('generate')
    config.generate.update(teacher=str(tmp_path / 'teacher'), num_pairs=50, shard_size=10, batch_size=8,
                           sampler='euler@4')
    generate.generate_couplings(config, tmp_path / 'full')
    write = couplings.write_shard

    def write_then_interrupt(path, k, arrays, dtype):
        write(path, k, arrays, dtype)
        if k == 1:
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(couplings, 'write_shard', write_then_interrupt)
    with pytest.raises(errors.Preempted) as e:
        generate.generate_couplings(config, tmp_path / 'split')
    assert e.value.signum == signal.SIGINT and signal.getsignal(signal.SIGINT) is previous
    assert str(e.value) == (f"interrupted in the coupling pass; 2 of 5 shards saved in {tmp_path / 'split'}; "
                            'rerun the same command to resume')
    assert couplings.present_shards(tmp_path / 'split', 5) == [0, 1]
    stray = tmp_path / 'split' / 'shard-000002.npz.tmp-0123abcd'  # a write a kill cut short
    stray.write_bytes(b'PK\x03\x04 half a shard')
    monkeypatch.setattr(couplings, 'write_shard', write)
    assert generate.generate_couplings(config, tmp_path / 'split')['new_shards'] == 3
    assert not stray.exists()
    _assert_same(_stored(tmp_path / 'split'), _stored(tmp_path / 'full'))


def test_a_second_signal_kills_at_once(tmp_path):
    script = ('import time\nfrom flowjax import preemption\nwith preemption.Watch():\n'
              "    print('watching', flush=True)\n    while True:\n        time.sleep(0.01)\n")
    err = tmp_path / 'stderr'
    with err.open('w') as stderr:
        proc = subprocess.Popen([sys.executable, '-c', script], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=stderr, text=True)
        assert proc.stdout.readline() == 'watching\n'
        proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: 'SIGTERM received' in err.read_text(), proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == -signal.SIGTERM


# The reflow pipeline with stages long enough that signals land mid-training, and checkpoints every 50-100 steps.
PIPELINE = ('--config=experiments/toy2d_reflow.py:runlocal', '--config.couplings.generate.sampler=euler@4',
            '--config.evaluate.eval.samplers=("euler@2",)', '--config.teacher.train.steps=1000',
            '--config.teacher.train.log_every=100', '--config.teacher.train.checkpoint_every=100',
            *(f'--config.{s}.train.{f}={v}' for s in ('reflow', 'distill')
              for f, v in (('steps', 200), ('log_every', 50), ('checkpoint_every', 50))))


def _start(workdir, err):
    return subprocess.Popen([sys.executable, '-m', 'flowjax.main', *PIPELINE, f'--workdir={workdir}'], cwd=ROOT,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=err)


def _wait_for(condition, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f'exited with {proc.returncode} before the condition held'
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _exports(workdir):
    return {stage: checkpoint.load_export(workdir / stage)[0] for stage in ('teacher', 'reflow', 'distill')}


def test_pipeline_survives_sigterm_and_kill9(tmp_path):
    started = time.monotonic()
    with (tmp_path / 'reference.log').open('w') as err:
        assert _start(tmp_path / 'reference', err).wait(timeout=600) == 0
    seconds = time.monotonic() - started

    run, log = tmp_path / 'run', tmp_path / 'run.log'
    with log.open('w') as err:  # SIGTERM once the teacher has logged: it saves its step and exits with 143
        proc = _start(run, err)
        _wait_for(lambda: (run / 'teacher' / 'metrics.jsonl').exists(), proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    last = log.read_text().strip().splitlines()[-1]
    match = re.fullmatch(r'flowjax: preempted at step (\d+); checkpoint saved in (.+); rerun the same command '
                         'to resume', last)
    assert match and match.group(2) == str(run / 'teacher' / 'checkpoints'), last
    assert (run / 'teacher' / 'checkpoints' / match.group(1) / 'commit_success.txt').exists()

    delay = random.Random(7).uniform(1.0, 0.8 * seconds)
    print(f'kill -9 after {delay:.1f} s of the rerun (an uninterrupted run took {seconds:.1f} s)')
    with log.open('a') as err:
        proc = _start(run, err)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    print('stages finished when killed:', [s for s in ('teacher', 'couplings', 'reflow', 'distill', 'evaluate')
                                           if (run / s / 'stage.json').exists()])
    with log.open('a') as err:
        assert _start(run, err).wait(timeout=600) == 0, log.read_text()[-3000:]

    report = json.loads((run / 'report.json').read_text())
    assert report == json.loads((tmp_path / 'reference' / 'report.json').read_text())
    _assert_identical(_exports(run), _exports(tmp_path / 'reference'))
    leftovers = [p for p in run.rglob('*') if '.tmp' in p.name or '.orbax-checkpoint-tmp' in p.name]
    assert not leftovers
