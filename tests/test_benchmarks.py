"""The benchmark scripts run (tiny, on CPU) and their FLOP count and profile summary are right.
Speed itself is measured on accelerators and recorded in benchmarks/RESULTS.md, never asserted."""

import gzip
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / 'benchmarks'))
import measure  # noqa: E402


def test_flops_count_convolutions_and_matrix_products():
    conv = nn.Conv(16, (3, 3), padding='SAME')
    x = jnp.zeros((2, 8, 8, 4))
    params = conv.init(jax.random.key(0), x)
    assert measure.flops(conv.apply, params, x) == 2 * (2 * 8 * 8 * 16) * (3 * 3 * 4)
    dense = lambda a, b: jax.lax.scan(lambda c, _: (c @ b, None), a, None, length=3)[0]
    assert measure.flops(dense, jnp.zeros((5, 6)), jnp.zeros((6, 6))) == 3 * 2 * 5 * 6 * 6


def test_rf_cifar_model_flops_match_the_reference_count():
    """65.1 GFLOP per training image (3x a 21.7 GFLOP forward) for the 61.8M DDPM++."""
    from flowjax import models

    module = models.build(measure.experiment('rf_cifar').model)
    x, t = jnp.zeros((1, 32, 32, 3)), jnp.zeros((1,))
    params = jax.eval_shape(module.init, jax.random.key(0), x, t)
    assert measure.flops(module.apply, params, x, t) / 1e9 == pytest.approx(21.69, abs=0.01)


def test_trace_summary_sums_stream_kernels_by_kind(tmp_path):
    events = [
        {'ph': 'M', 'pid': 1, 'name': 'process_name', 'args': {'name': '/device:GPU:0'}},
        {'ph': 'M', 'pid': 1, 'tid': 7, 'name': 'thread_name', 'args': {'name': 'Stream #7(Compute)'}},
        {'ph': 'M', 'pid': 1, 'tid': 8, 'name': 'thread_name', 'args': {'name': 'XLA Ops'}},
        {'ph': 'M', 'pid': 2, 'name': 'process_name', 'args': {'name': '/host:CPU'}},
        {'ph': 'X', 'pid': 1, 'tid': 7, 'name': 'sm90_xmma_fprop_implicit_gemm', 'ts': 0, 'dur': 600},
        {'ph': 'X', 'pid': 1, 'tid': 7, 'name': 'input_reduce_fusion_3', 'ts': 700, 'dur': 100},
        {'ph': 'X', 'pid': 1, 'tid': 7, 'name': 'loop_add_fusion', 'ts': 800, 'dur': 200},
        {'ph': 'X', 'pid': 1, 'tid': 8, 'name': 'fusion.3', 'ts': 0, 'dur': 1000},  # derived line: not a kernel
        {'ph': 'X', 'pid': 2, 'tid': 1, 'name': 'loop_add_fusion', 'ts': 0, 'dur': 5000},  # host
    ]
    path = tmp_path / 'perfetto_trace.json.gz'
    with gzip.open(path, 'wt') as f:
        json.dump({'traceEvents': events}, f)
    summary = measure.summarize_trace(path, calls=2)
    assert summary['ms_per_call'] == pytest.approx({'span': 0.5, 'busy': 0.45, 'conv / matmul': 0.3,
                                                    'elementwise fusion': 0.1, 'reduction fusion': 0.05})
    assert summary['kernels_per_call'] == 1.5


@pytest.mark.parametrize('script, args, column', [
    ('train_step.py', ['--batch', '8', '--steps', '2', '--data', 'real'], 'img/s'),
    ('coupling_pass.py', ['--batch', '8', '--sampler', 'euler@2', '--pass'], 'img*NFE/s'),
])
def test_benchmark_script_prints_its_table(script, args, column, tmp_path):
    cmd = [sys.executable, str(ROOT / 'benchmarks' / script), '--arg', 'runlocal', '--out', str(tmp_path), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    header, _, row = done.stdout.strip().splitlines()[-3:]
    cells = dict(zip(header.strip('|').split('|'), row.strip('|').split('|')))
    cells = {k.strip(): v.strip() for k, v in cells.items()}
    assert cells['note'] == '-', cells
    assert float(cells[column].replace(',', '')) > 0
    assert json.loads((tmp_path / 'results.jsonl').read_text())['batch'] == 8


def _last_table(stdout: str) -> list[dict]:
    """The rows of the last markdown table printed (the line before its last '|---' line is its header)."""
    lines = [line for line in stdout.strip().splitlines() if line.startswith('|')]
    start = max(i for i in range(len(lines) - 1) if lines[i + 1].startswith('|---'))
    header = [h.strip() for h in lines[start].strip('|').split('|')]
    return [dict(zip(header, (c.strip() for c in line.strip('|').split('|')))) for line in lines[start + 2:]]


@pytest.mark.parametrize('script, args, check', [
    ('cpu_pipelines.py', ['--experiment', 'toy2d_reflow', '--arg', 'runlocal', '--set', 'train.n_jitted_steps=2'],
     lambda rows: [r['stage'] for r in rows] == ['teacher', 'couplings', 'reflow', 'distill', 'evaluate',
                                                 'total (process)'] and float(rows[0]['train steps/s']) > 0),
    ('input_pipeline.py', ['--batch', '8', '--steps', '5'], lambda rows: float(rows[0]['img/s'].replace(',', '')) > 0),
    ('coupling_reader.py', ['--pairs', '300', '--shard_size', '100', '--batch', '16', '--steps', '3', '--threads', '1',
                            '--cache', 'warm', '--repeats', '1'],
     lambda rows: [r['reader'] for r in rows] == ['load', 'pread x1', 'pread x1, no hints', 'mmap']
     and all(r['note'] == '-' and float(r['rows/s'].replace(',', '')) > 0 for r in rows)),
    # one bfloat16 run (the script runs each dtype:seed alike, in its own process; two would double the time)
    ('bf16_quality.py', ['--arg', 'runlocal', '--steps', '10', '--runs', 'bfloat16:0', '--samplers', 'euler@2'],
     lambda rows: [r['dtype'] for r in rows] == ['bfloat16'] and all(r['note'] == '-' for r in rows)),
])
def test_cpu_benchmark_scripts_print_their_tables(script, args, check):
    done = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / script), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = _last_table(done.stdout)
    assert check(rows), done.stdout[-3000:]
