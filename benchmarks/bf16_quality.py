"""Does bfloat16 compute change training? The same short run in float32 (two seeds: the noise
floor) and in bfloat16 (model.dtype: activations and matrix products in bf16, parameters,
optimiser, EMA and loss in float32): loss curves and sample quality side by side.

    python benchmarks/bf16_quality.py                      # the digits teacher, on a CPU in minutes
    python benchmarks/bf16_quality.py --experiment rf_cifar --stage '' --steps 20000 --samplers euler@100

Each run trains the experiment's stage (`--stage`; '' for a single-method experiment) with its
own method for `--steps` steps in a fresh workdir, in its own process, and evaluates the EMA
weights with the experiment's metric at `--samplers`. Prints the loss every few logged steps
and one row a run: the mean loss of the last quarter of the run and the metric at each sampler.
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import measure  # noqa: E402


def run_case(case: dict) -> dict:
    from flowjax.methods import table

    config = measure.experiment(case['experiment'], case.get('arg'))
    if case['stage']:
        config = config[case['stage']]
    config.model.dtype = case['dtype']
    config.seed = case['seed']
    config.train.steps = case['steps']
    config.eval.samplers = tuple(case['samplers'])
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        table.METHODS[config.method].run(config, tmp)
        seconds = time.perf_counter() - started
        logged = [json.loads(line) for line in (pathlib.Path(tmp) / 'metrics.jsonl').read_text().splitlines()]
        report = json.loads((pathlib.Path(tmp) / 'report.json').read_text())
    scores = next(iter(v for k, v in report.items() if isinstance(v, dict) and 'params' in v))
    metric = next(k for k in scores[case['samplers'][0]] if k != 'nfe')
    last = logged[-max(len(logged) // 4, 1):]
    return {**case, 'seconds': seconds, 'metric': metric, 'curve': [(r['step'], r['loss']) for r in logged],
            'final_loss': sum(r['loss'] for r in last) / len(last),
            **{s: scores[s][metric] for s in case['samplers']}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--case', help='internal: run one case (JSON) and print its result')
    parser.add_argument('--experiment', default='digits_reflow')
    parser.add_argument('--arg', default=None)
    parser.add_argument('--stage', default='teacher', help="the pipeline stage to train ('': the experiment itself)")
    parser.add_argument('--steps', type=int, default=1500)
    parser.add_argument('--runs', nargs='+', default=['float32:0', 'float32:1', 'bfloat16:0'], help='dtype:seed')
    parser.add_argument('--samplers', nargs='+', default=['euler@8', 'euler@32'])
    parser.add_argument('--timeout', type=float, default=3600)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    rows = []
    for run in args.runs:
        dtype, _, seed = run.partition(':')
        case = dict(experiment=args.experiment, arg=args.arg, stage=args.stage, dtype=dtype, seed=int(seed or 0),
                    steps=args.steps, samplers=args.samplers)
        rows.append(measure.run_isolated(__file__, case, args.timeout))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != 'curve'}), flush=True)
    ok = [r for r in rows if 'curve' in r]
    if ok:
        curves = [dict(r['curve']) for r in ok]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        shown = sorted(set(steps[::max(len(steps) // 10, 1)] + steps[-1:]))
        print('\nloss by step (mean over each logging interval):')
        print(measure.table([{'step': s, **{f'{r["dtype"]} seed {r["seed"]}': c[s] for r, c in zip(ok, curves)}}
                             for s in shown],
                            [('step', 'step', '')] + [(f'{r["dtype"]} seed {r["seed"]}',) * 2 + ('.4f',) for r in ok]))
    metric = ok[0]['metric'] if ok else 'metric'
    columns = [('dtype', 'dtype', ''), ('seed', 'seed', ''), ('steps', 'steps', ''),
               ('final_loss', 'loss (last quarter)', '.4f')]
    columns += [(s, f'{metric} {s}', '.3f') for s in args.samplers]
    columns += [('seconds', 'seconds', '.0f'), ('note', 'note', '')]
    print(f'\nfloat32 vs bfloat16, {args.experiment} {args.stage}:'.rstrip())
    print(measure.table(rows, columns))


if __name__ == '__main__':
    main()
