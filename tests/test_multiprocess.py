"""Several processes: the toy reflow pipeline as 2 processes x 4 CPU devices (launch/local.sh) gives the
parameters, pairs and report of 1 process x 8 devices; a 2 x 4 image evaluation splits its work between the
processes and reports what 1 x 8 does; the launch scripts parse and dry-run."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, experiment_config, random_export
from flowjax import checkpoint, configs, evaluate
from flowjax.data import couplings

# 4 coupling shards of 128 pairs: process 0 of 2 writes shards 0 and 2, process 1 shards 1 and 3.
PIPELINE = ['--config=experiments/toy2d_reflow.py:runlocal', '--config.couplings.generate.shard_size=128',
            '--config.couplings.generate.batch_size=128']
STUDENTS = ('reflow', 'distill')
SCRIPTS = ('launch/local.sh', 'launch/slurm.sbatch', 'launch/tpu_pod.sh', 'launch/common.sh')
# An evaluation of one digits model: batches of 32 rows, 4 per device; process 0 of 2 holds rows 0..15 of each.
EVALUATE = """from flowjax import configs


def get_config(arg=None):
    c = configs.experiment({recipe!r}, 'digits_reflow', 'runlocal').evaluate
    c.eval.update(models=({model!r},), couplings=None, samplers=('euler@2',), reconstruction=8, num_samples=64,
                  batch_size=32, straightness_steps=2, grid=4)
    return c
"""


def _env(**extra):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
    for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'FLOWJAX_DISTRIBUTED'):
        env.pop(name, None)
    return {**env, **extra}


def _one_process(workdir, *flags):
    return subprocess.run([sys.executable, '-m', 'flowjax.main', *PIPELINE, f'--workdir={workdir}', *flags],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)


def _local(processes, devices, *args, **env):
    return subprocess.run(['launch/local.sh', str(processes), str(devices), *args], cwd=ROOT,
                          env=_env(PYTHON=sys.executable, **env), capture_output=True, text=True, timeout=600)


def _params(workdir, stage):
    return checkpoint.load_export(workdir / stage)[0]


def _assert_params_close(a, b, what):
    # The gradient mean is an all-reduce over the 8 devices: in one process XLA sums the devices'
    # terms in one order, across processes gloo's ring sums them in another, so the float32 sums can
    # differ in the last bit and 40 Adam steps carry that on (measured: at most 6e-8, in about 15% of the weights).
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=5e-7, err_msg=f'{what} {jax.tree_util.keystr(path)}')


def _assert_report_close(a, b, path=''):
    """Fixed-step scores agree to float rounding; rk45's adaptive step choices turn the students'
    last-bit differences into other step sequences (measured: NFE 109 vs 127), so its samples and
    scores agree only to about its tolerance."""
    assert type(a) is type(b) or {type(a), type(b)} <= {int, float}, path
    adaptive = '.rk45.' in path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_report_close(a[key], b[key], f'{path}.{key}')
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=5e-3 if adaptive else 1e-6, abs=1e-9), path
    elif adaptive and path.endswith('.nfe'):
        assert b == pytest.approx(a, rel=0.3), path
    else:
        assert a == b, path


def test_two_processes_match_one_process(tmp_path):
    two, one, teacher = tmp_path / 'two', tmp_path / 'one', tmp_path / 'teacher'
    result = _local(2, 4, '--', *PIPELINE, f'--workdir={two}')
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert 'process 0 of 2, 8 devices in all' in result.stdout  # process 0's log is shown
    logs = {i: (two / 'logs' / f'process_{i}.log').read_text() for i in (0, 1)}
    assert 'process 1 of 2, 8 devices in all' in logs[1] and 'process 1 of 2' not in result.stdout

    # The teacher trained alone on 1 x 8 devices; the rest of the pipeline on 1 x 8 from the
    # 2 x 4 teacher, so the pairs and students are compared given the same teacher.
    alone = _one_process(teacher, "--config.stages=('teacher',)")
    assert alone.returncode == 0, alone.stderr[-3000:]
    _assert_params_close(_params(two, 'teacher'), _params(teacher, 'teacher'), 'teacher')
    rest = _one_process(one, f'--config.teacher.checkpoint={two / "teacher"}')
    assert rest.returncode == 0, rest.stderr[-3000:]

    # Pair i depends only on (seed, i) and its own ODE solve: the same bits in any process layout.
    pairs = {w: couplings.open_store(w / 'couplings').load() for w in (two, one)}
    assert len(pairs[two]['x0']) == 512
    for name in ('x0', 'x1', 'index', 'nfe'):
        np.testing.assert_array_equal(pairs[two][name], pairs[one][name], err_msg=name)
    written = {i: sorted({int(k) for k in re.findall(r'shard (\d+) ', logs[i])}) for i in (0, 1)}
    assert written == {0: [0, 2], 1: [1, 3]}

    for stage in STUDENTS:
        _assert_params_close(_params(two, stage), _params(one, stage), stage)
    report = json.loads((two / 'report.json').read_text())
    _assert_report_close(report, json.loads((one / 'report.json').read_text()))
    assert set(report) == {'teacher', 'reflow', 'distill', 'couplings'}

    # One writer: each metric line once, reports only where process 0 puts them, no leftovers.
    for stage in ('teacher', *STUDENTS):
        steps = [json.loads(line)['step'] for line in (two / stage / 'metrics.jsonl').read_text().splitlines()]
        assert steps == [10, 20, 30, 40], stage
    reports = sorted(str(p.relative_to(two)) for p in two.rglob('report.*'))
    assert reports == ['evaluate/report.json', 'evaluate/report.md', 'report.json', 'report.md']
    assert sorted(p.name for p in (two / 'logs').iterdir()) == ['process_0.log', 'process_1.log']
    assert not [p for p in two.rglob('*') if '.tmp' in p.name or 'staging' in p.name]


def _counts(log: str, what: str) -> list[tuple[int, int]]:
    """(done here, of all) per log line '<what> <n> of <m> <...> on process <i>'."""
    pattern = re.escape(what) + r' (\d+) of (\d+) \w+ (?:sampled|extracted) on process'
    return [(int(n), int(m)) for n, m in re.findall(pattern, log)]


def test_two_processes_split_the_evaluation(tmp_path):
    """Each process samples, embeds and scores only its rows of every batch (the reference images and the
    floor's too; its log counts them); the features and scores are gathered, so the report is that of one
    process."""
    model = random_export(experiment_config('digits_reflow', 'runlocal').teacher, tmp_path / 'model')
    recipe = tmp_path / 'evaluate.py'
    recipe.write_text(EVALUATE.format(recipe=str(ROOT / 'experiments' / 'digits_reflow.py'), model=f'm={model}'))
    two, one = tmp_path / 'two', tmp_path / 'one'
    result = _local(2, 4, '--', f'--config={recipe}', f'--workdir={two}')
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    alone = evaluate.run(configs.experiment(recipe, 'evaluate'), str(one))  # this process: 1 x 8 devices

    # Every row is computed as on one process with the same rows per device: the U-Net's samples came out bit for
    # bit the same here, but CPU convolutions do not promise that for every shape (at 8 rows per device scores
    # differed by up to 4e-6), so those are compared to 1e-6; the classifier's floor and reference statistics exactly.
    report = json.loads((two / 'report.json').read_text())
    assert report['m']['fd_digits_data'] == alone['m']['fd_digits_data']
    assert report['m']['euler@2']['nfe'] == 2 and report['m']['euler@2']['reconstruction_nfe'] == 4
    _assert_report_close(report, alone)
    stats = [np.load(next(w.glob('fd_digits_stats_*.npz'))) for w in (two, one)]
    for name in ('mu', 'sigma'):
        np.testing.assert_array_equal(stats[0][name], stats[1][name])

    logs = [(two / 'logs' / f'process_{i}.log').read_text() for i in (0, 1)]
    sampled = [_counts(log, 'evaluate m euler@2:') for log in logs]
    samples = [_counts(log, 'fd_digits: features of') for log in logs]
    assert sampled == [[(32, 64)], [(32, 64)]]
    # the reference images (1797, then their mirror images), the floor's 64 real images, the 64 samples
    assert samples == [[(901, 1797), (901, 1797), (32, 64), (32, 64)], [(896, 1797), (896, 1797), (32, 64), (32, 64)]]
    written = sorted(p.name for p in two.iterdir() if not p.name.startswith('fd_digits_stats_'))
    assert written == ['logs', 'report.json', 'report.md', 'samples.png', 'tensorboard']  # samples.png as an image
    assert len(list((two / 'tensorboard').iterdir())) == 1  # one event file: process 0's


def test_local_launch_failures(tmp_path):
    usage = _local(0, 4, '--', '--config=experiments/toy2d_rf.py:runlocal', f'--workdir={tmp_path}')
    assert usage.returncode == 2 and 'NUM_PROCESSES=0' in usage.stderr.splitlines()[-1]
    assert _local(2, 4, '--config=x').returncode == 2  # no --
    no_workdir = _local(2, 4, '--', '--config=experiments/toy2d_rf.py:runlocal')
    assert no_workdir.returncode == 2 and '--workdir is required' in no_workdir.stderr
    # Every process refuses the config: the first failure's status, and its one-line error.
    bad = _local(2, 2, '--', '--config=experiments/toy2d_rf.py:runlocal', f'--workdir={tmp_path}',
                 '--config.train.steps=-4')
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert 'flowjax: error: train.steps=-4' in bad.stdout
    assert 'stopping the others' in bad.stderr


def test_local_launch_gives_each_process_one_gpu(tmp_path):
    """`gpu` mode: process i sees only GPU i, no CPU platform is forced; a stand-in Python prints what it got."""
    fake = tmp_path / 'python'
    fake.write_text('#!/bin/sh\necho "process $JAX_PROCESS_ID of $JAX_NUM_PROCESSES: GPU ${CUDA_VISIBLE_DEVICES:-all} '
                    'platform ${JAX_PLATFORMS:-any}"\n')
    fake.chmod(0o755)
    env = _env(PYTHON=str(fake))
    env.pop('JAX_PLATFORMS')
    done = subprocess.run(['launch/local.sh', '3', 'gpu', '--', '--config=x.py', f'--workdir={tmp_path}'], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and 'one GPU each' in done.stderr, done.stderr
    logs = [(tmp_path / 'logs' / f'process_{i}.log').read_text().strip().splitlines()[-1] for i in range(3)]
    assert logs == [f'process {i} of 3: GPU {i} platform any' for i in range(3)]


@pytest.mark.parametrize('env, fragment', [
    ({'JAX_COORDINATOR_ADDRESS': 'localhost:1', 'JAX_NUM_PROCESSES': 'two', 'JAX_PROCESS_ID': '0'},
     "JAX_NUM_PROCESSES='two'"),
    ({'JAX_COORDINATOR_ADDRESS': 'localhost:1', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '2'},
     'JAX_PROCESS_ID=2, JAX_NUM_PROCESSES=2'),
    ({'JAX_COORDINATOR_ADDRESS': 'localhost', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '0'},
     'expected host:port'),
])
def test_bad_distributed_variables_are_one_line(tmp_path, env, fragment):
    result = subprocess.run([sys.executable, '-m', 'flowjax.main', '--config=experiments/toy2d_rf.py:runlocal',
                             f'--workdir={tmp_path}'], cwd=ROOT, env=_env(**env), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('flowjax: error:') and fragment in lines[0], result.stderr


def test_unreachable_coordinator_is_one_line():
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(('localhost', 0))
        port = s.getsockname()[1]
    code = 'from flowjax import distributed, main; distributed.COORDINATOR_WAIT_S = 1; main.start_distributed()'
    env = _env(JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2', JAX_PROCESS_ID='1')
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f'localhost:{port}: no coordinator answered within 1 s' in lines[0], result.stderr


def test_launch_scripts_parse():
    for script in SCRIPTS:
        result = subprocess.run(['bash', '-n', script], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, f'{script}: {result.stderr}'


def test_tpu_pod_dry_run_prints_gcloud_commands(tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    calls = tmp_path / 'gcloud-calls'
    (bin_dir / 'gcloud').write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / 'gcloud').chmod(0o755)
    env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', TPU_NAME='pod-a', ZONE='europe-west4-a',
               ACCELERATOR_TYPE='v5litepod-16', RUNTIME_VERSION='v2-alpha-tpuv5-lite', PROJECT='proj')
    flags = ['--config=experiments/rf_cifar.py', '--workdir=gs://bucket/run', '--config.train.steps=10']
    result = subprocess.run(['launch/tpu_pod.sh', '--dry-run', '--', *flags], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not calls.exists()  # printed, not run
    commands = [line[2:] for line in result.stderr.splitlines() if line.startswith('+ ')]
    where = '--zone=europe-west4-a --project=proj'
    assert commands[0] == f"gcloud compute tpus tpu-vm describe pod-a {where} '--format=value(state)'"
    assert commands[1] == (f'gcloud compute tpus tpu-vm create pod-a {where} --accelerator-type=v5litepod-16 '
                           '--version=v2-alpha-tpuv5-lite')
    assert re.fullmatch(r'git archive --format=tar\.gz -o /tmp/(flowjax-[\d-]+\.tar\.gz) HEAD', commands[2])
    archive = re.search(r'flowjax-[\d-]+\.tar\.gz', commands[2]).group()
    assert commands[3] == f'gcloud compute tpus tpu-vm scp /tmp/{archive} pod-a: {where} --worker=all'
    ssh = f'gcloud compute tpus tpu-vm ssh pod-a {where} --worker=all'
    assert all(c.startswith(ssh + " '--command=") for c in commands[4:]) and len(commands) == 7
    assert f'tar -xzf ~/{archive} -C ~/flowjax' in commands[4]
    assert 'pip install -q --python .venv/bin/python -e . jax\\[tpu\\]' in commands[5]
    assert ('FLOWJAX_DISTRIBUTED=1 nohup .venv/bin/python -m flowjax.main ' + ' '.join(flags)) in commands[6]
    assert re.search(r'> ~/flowjax-logs/[\d-]+\.log 2>&1 < /dev/null &', commands[6])
    # A workdir on one worker's disk cannot be shared by the pod.
    local = subprocess.run(['launch/tpu_pod.sh', '--dry-run', '--', flags[0], '--workdir=runs/x'], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=60)
    assert local.returncode == 2 and 'gs://' in local.stderr.splitlines()[-1]
