"""Does bfloat16 compute change training? The same short run in float32 (two seeds: the noise
floor) and in bfloat16 (model.dtype: activations and matrix products in bf16, parameters,
optimiser, EMA and loss in float32): loss curves and sample quality side by side.

    python benchmarks/bf16_quality.py                      # the digits teacher, on a CPU in minutes
    python benchmarks/bf16_quality.py --experiment rf_cifar --stage '' --steps 20000 --samplers euler@100
    python benchmarks/bf16_quality.py --experiment rf_cifar --stage '' --images digits32 --steps 3000 \
        --warmup 400 --samplers euler@8 euler@32 --out runs/bf16_cifar   # the CIFAR model on a GPU, no dataset

Each run trains the experiment's stage (`--stage`; '' for a single-method experiment) with its
own method for `--steps` steps in a fresh workdir, in its own process, and evaluates the EMA
weights with the experiment's metric at `--samplers`. `--images digits32` trains on the shipped
8x8 digits scaled to 32x32x3 (nearest neighbour, grey in every channel) instead of the
experiment's data, so the 32x32 CIFAR model runs where no CIFAR-10 and no Inception weights are
(e.g. a GPU machine without downloads): its samples, pooled back to 8x8 grey, are scored with
fd_digits against the digits, and with `--out` each run's samples are saved as a PNG. Prints the loss every few logged steps
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
    config.train.log_every = max(case['steps'] // 40, 1)  # a loss curve of about 40 points
    if case.get('warmup') is not None:
        config.train.warmup_steps = case['warmup']
    with tempfile.TemporaryDirectory() as tmp:
        if case.get('images') == 'digits32':
            config.data.image = {'name': 'npz', 'path': _digits32(pathlib.Path(tmp) / 'digits32.npz')}
            config.data.flip = False
            config.eval.metric = 'none'
            config.eval.num_samples = config.eval.batch_size  # the job's own evaluation: grids only
        started = time.perf_counter()
        table.METHODS[config.method].run(config, tmp)
        seconds = time.perf_counter() - started
        logged = [json.loads(line) for line in (pathlib.Path(tmp) / 'metrics.jsonl').read_text().splitlines()]
        if case.get('images') == 'digits32':
            metric, values = 'fd_digits (pooled)', _score_digits32(tmp, case)
        else:
            report = json.loads((pathlib.Path(tmp) / 'report.json').read_text())
            scores = next(iter(v for k, v in report.items() if isinstance(v, dict) and 'params' in v))
            metric = next(k for k in scores[case['samplers'][0]] if k != 'nfe')
            values = {s: scores[s][metric] for s in case['samplers']}
    last = logged[-max(len(logged) // 4, 1):]
    return {**case, 'seconds': seconds, 'metric': metric, 'curve': [(r['step'], r['loss']) for r in logged],
            'final_loss': sum(r['loss'] for r in last) / len(last), **values}


def _digits32(path: pathlib.Path) -> str:
    """The shipped digits as uint8 32x32x3 images (each pixel a 4x4 block, grey in every channel)."""
    import numpy as np

    from flowjax.data import images

    digits = np.rint((images.digits()[0] + 1.0) * 127.5).astype(np.uint8)  # (N, 8, 8, 1)
    np.savez(path, images=np.repeat(np.repeat(np.repeat(digits, 4, axis=1), 4, axis=2), 3, axis=3))
    return str(path)


def _score_digits32(workdir: str, case: dict) -> dict:
    """fd_digits of the export's samples (from one fixed noise draw), pooled to 8x8 grey, against the digits."""
    import numpy as np

    from flowjax import checkpoint
    from flowjax.data import images
    from flowjax.evaluation import frechet, job
    from flowjax.flows import solvers
    from flowjax.methods import training
    from flowjax.metrics import digits_classifier

    model = training.load_model(str(checkpoint.export_dir(workdir)), 'export')
    eps = model.meta.get('flow', {}).get('t_eps', 1e-3)
    module, variables = digits_classifier.load()
    features = digits_classifier.feature_fn(module)
    real = images.digits()[0]
    reference = frechet.statistics(np.asarray(features(variables, real)))
    noise = np.random.default_rng(0xB16).standard_normal((len(real), 32, 32, 3), dtype=np.float32)
    scores, grids = {}, {}
    for spec in case['samplers']:
        sample = job.kind_function(model.kind, 'sample', solvers.parse_sampler(spec), eps)
        x = np.concatenate([np.asarray(sample(model.params, noise[i:i + 256], None)[0])
                            for i in range(0, len(noise), 256)])
        pooled = np.clip(x, -1, 1).reshape(len(x), 8, 4, 8, 4, 3).mean(axis=(2, 4, 5))[..., None]
        scores[spec] = frechet.frechet_distance(*frechet.statistics(np.asarray(features(variables, pooled))),
                                                *reference)
        grids[f'{spec}: fd_digits {scores[spec]:.3f}'] = x[:64]
    if case.get('out'):
        from etils import epath

        from flowjax.evaluation import images as grid_images

        epath.Path(case["out"]).mkdir(parents=True, exist_ok=True)
        name = f"samples_{case['dtype']}_seed{case['seed']}.png"
        grid_images.save_grids(epath.Path(case['out']) / name, {f"{case['dtype']} seed {case['seed']}": grids},
                               None, title=f"{case['experiment']} on digits32, {case['steps']} steps")
    return scores


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
    parser.add_argument('--images', choices=['digits32'], default=None,
                        help="train on the digits scaled to 32x32x3 instead of the experiment's data")
    parser.add_argument('--out', default=None, help='with --images: a directory for the sample PNGs')
    parser.add_argument('--warmup', type=int, default=None,
                        help="train.warmup_steps (default: the recipe's; a short run may never reach its lr)")
    args = parser.parse_args()
    if args.case:
        from absl import logging

        logging.set_verbosity(logging.INFO)  # the run's progress on stderr
        print(json.dumps(run_case(json.loads(args.case))))
        return
    rows = []
    for run in args.runs:
        dtype, _, seed = run.partition(':')
        case = dict(experiment=args.experiment, arg=args.arg, stage=args.stage, dtype=dtype, seed=int(seed or 0),
                    steps=args.steps, warmup=args.warmup, samplers=args.samplers, images=args.images,
                    out=args.out and str(pathlib.Path(args.out).resolve()))
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
