"""Wall time of the embedded-data pipelines on the CPU, stage by stage.

    python benchmarks/cpu_pipelines.py                      # toy2d_reflow and digits_reflow
    python benchmarks/cpu_pipelines.py --experiment toy2d_reflow --set train.n_jitted_steps=10

Runs `python -m flowjax.main` on each experiment in a fresh workdir (on the CPU, whatever else
the machine has) and reads each stage's time from its stage.json; training stages also report
their steps/s (the mean over logged intervals after the first, which holds the compilation) and
the coupling stage its pairs/s. `--set field=value` applies to every stage that has the field
(`train.*` goes to the training stages). Prints one markdown table.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import measure  # noqa: E402

COLUMNS = (('experiment', 'experiment', ''), ('set', 'overrides', ''), ('stage', 'stage', ''),
           ('method', 'method', ''), ('seconds', 'seconds', '.1f'), ('steps_per_s', 'train steps/s', ',.1f'),
           ('pairs_per_s', 'pairs/s', ',.0f'), ('note', 'note', ''))


def stage_overrides(name: str, arg: str | None, assignments: list[str]) -> list[str]:
    """--config.<stage>.<field>=<value> for each stage of the pipeline that has the field."""
    config = measure.experiment(name, arg)
    flags = []
    for assignment in assignments:
        field, _, value = assignment.partition('=')
        section, _, key = field.partition('.')
        for stage in config.stages:
            if section in config[stage] and key in config[stage][section]:
                flags.append(f'--config.{stage}.{field}={value}')
    return flags


def run(name: str, arg: str | None, assignments: list[str], timeout: float) -> list[dict]:
    spec = f'{name}.py' + (f':{arg}' if arg else '')
    base = {'experiment': spec, 'set': ' '.join(assignments) or '-'}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = pathlib.Path(tmp) / 'run'
        cmd = [sys.executable, '-m', 'flowjax.main', f'--config={measure.EXPERIMENTS / spec}', f'--workdir={workdir}',
               *stage_overrides(name, arg, assignments)]
        env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=measure.REPO, env=env)
        total = time.perf_counter() - started
        if done.returncode:
            return [{**base, 'stage': 'all', 'error': (done.stderr.strip().splitlines() or ['?'])[-1][:300]}]
        rows = []
        for stage in measure.experiment(name, arg).stages:
            marker = json.loads((workdir / stage / 'stage.json').read_text())
            row = {**base, 'stage': stage, 'method': marker['method'], 'seconds': marker.get('seconds')}
            metrics = workdir / stage / 'metrics.jsonl'
            if metrics.exists():
                rates = [json.loads(line)['steps_per_sec'] for line in metrics.read_text().splitlines()][1:]
                row['steps_per_s'] = sum(rates) / len(rates) if rates else None
            if marker['method'] == 'generate':
                row['pairs_per_s'] = marker['result']['num_pairs'] / marker['seconds']
            rows.append(row)
        rows.append({**base, 'stage': 'total (process)', 'seconds': total})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--experiment', nargs='+', default=['toy2d_reflow', 'digits_reflow'])
    parser.add_argument('--arg', default=None, help="the experiments' :arg (e.g. runlocal)")
    parser.add_argument('--set', nargs='*', default=[], dest='assignments', help='field=value for every stage')
    parser.add_argument('--timeout', type=float, default=3600)
    args = parser.parse_args()
    rows = []
    for name in args.experiment:
        rows += run(name, args.arg, args.assignments, args.timeout)
        print(measure.table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
    print(f'\npipelines on the CPU ({os.cpu_count()} cores):')
    print(measure.table(rows, COLUMNS))


if __name__ == '__main__':
    main()
