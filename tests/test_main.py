"""The command line: the runlocal experiment runs end to end (bad input: test_bad_input.py)."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def _main(*args, cwd=ROOT):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
    return subprocess.run([sys.executable, '-m', 'flowjax.main', *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    # A run that got as far as compiling has said where its compile cache is (flowjax/compile_cache.py).
    lines = [line for line in result.stderr.strip().splitlines() if '] compile cache: ' not in line]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith('flowjax: error:')
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_toy2d_rf_runlocal_end_to_end(tmp_path):
    result = _main('--config=experiments/toy2d_rf.py:runlocal', f'--workdir={tmp_path}')
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / 'report.json').read_text())
    rf = report['rf']
    for key in ('euler@1', 'euler@4', 'heun@2', 'rk45'):
        assert set(rf[key]) >= {'w2', 'energy', 'nfe'}
    assert rf['euler@1']['nfe'] == 1 and rf['heun@2']['nfe'] == 4 and rf['rk45']['nfe'] > 6
    assert rf['w2_data'] > 0 and rf['straightness'] > 0
    for name in ('report.md', 'samples.png', 'metrics.jsonl', 'export/meta.json'):
        assert (tmp_path / name).exists(), name
    # A rerun finds the finished run, trains nothing, and reports the same numbers.
    again = _main('--config=experiments/toy2d_rf.py:runlocal', f'--workdir={tmp_path}')
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / 'report.json').read_text()) == report
