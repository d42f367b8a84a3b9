"""Training throughput of the rectified-flow CIFAR-10 recipe (experiments/rf_cifar.py: DDPM++,
61.8M parameters): the real train step (forward, backward, Adam, clipping, EMA) in the real loop.

    python benchmarks/train_step.py --batch 128 512 --dtype bfloat16 float32
    python benchmarks/train_step.py --batch 128 --data synthetic real --profile

Each case runs in its own process: it builds the recipe's model, loss (flowjax.methods.rf) and step
(train.jit_steps), warms up, then times `--calls` jit calls of train.loop with one device sync at
the end. `--data synthetic` feeds one batch that stays on the devices; `real` reads 50,000 uint8
32x32 images from an .npz through the image pipeline (shuffle, flips, transfer, read-ahead), as
training does. img/s counts training images; MFU is model FLOPs (3x the forward's convolutions
and matrix products) over the card's measured bf16 matrix rate. Prints one markdown table.
"""

import itertools
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import measure  # noqa: E402

COLUMNS = (('devices', 'devices', ''), ('processes', 'processes', ''), ('batch', 'batch', ''), ('dtype', 'dtype', ''), ('remat', 'remat', ''),
           ('n_jitted_steps', 'steps/call', ''), ('dropout', 'dropout', ''), ('data', 'data', ''),
           ('img_per_s', 'img/s', ',.0f'), ('ms_per_step', 'ms/step', '.1f'), ('mfu', 'MFU', '.1%'),
           ('peak_gib', 'peak GiB', '.1f'), ('compile_s', 'compile s', '.0f'), ('note', 'note', ''))


def run_case(case: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flowjax import models, sharding, train
    from flowjax.data import datasets
    from flowjax.methods import rf, training
    from flowjax.models import kinds

    config = measure.experiment(case.get('experiment', 'rf_cifar'), case.get('arg'))
    config.model.dtype = case['dtype']
    if case.get('dropout') is not None:
        config.model.dropout = case['dropout']
    config.train.batch_size = case['batch']
    config.train.remat = case['remat']
    config.train.n_jitted_steps = case['n_jitted_steps']
    mesh = sharding.data_mesh(jax.devices()[:case['devices']])
    module = models.build(config.model)
    shape = (32, 32, 3)
    with tempfile.TemporaryDirectory() as tmp:
        if case['data'] == 'real':
            path = pathlib.Path(tmp) / 'images.npz'
            np.savez(path, images=np.random.default_rng(0).integers(0, 256, (50_000, *shape), np.uint8))
            config.data.image = {'name': 'npz', 'path': str(path)}
            batches = datasets.make_batches(config, mesh, case['batch'], config.seed)
        else:
            fixed = {'x1': measure.global_array(measure.host_array((case['batch'], *shape)), sharding.batch_sharded(mesh))}
            batches = lambda step: fixed
        ctx = training.context(config, mesh)
        tx, schedule = train.optimizer(config.train)
        abstract, init = train.init_state(config, kinds.from_config(config), tx, shape, mesh)
        state = init()
        step_fn = train.jit_steps(config, rf.loss_fn, tx, schedule, abstract, mesh)
        n = case['n_jitted_steps']
        started = time.perf_counter()
        step_fn = step_fn.lower(state, tuple(batches(s) for s in range(n)), ctx).compile()
        compile_s = time.perf_counter() - started

        warmup = train.chunks(0, 3 * n, n)
        state = jax.block_until_ready(train.loop(step_fn, state, ctx, batches, warmup, config.train.prefetch))
        calls = max(case['steps'] // n, 1)
        timed = train.chunks(3 * n, (3 + calls) * n, n)
        started = time.perf_counter()
        state = jax.block_until_ready(train.loop(step_fn, state, ctx, batches, timed, config.train.prefetch))
        seconds = time.perf_counter() - started
        steps = calls * n
        result = {**case, 'img_per_s': steps * case['batch'] / seconds, 'ms_per_step': 1e3 * seconds / steps,
                  'compile_s': compile_s}

        x = jnp.zeros((1, *shape))
        t = jnp.zeros((1,))
        forward = measure.flops(module.apply, state.params, x, t)
        peak = case['peak_tflops'] * 1e12 * case['devices']
        result.update(gflop_per_img=3 * forward / 1e9, mfu=result['img_per_s'] * 3 * forward / peak,
                      peak_gib=measure.peak_memory_gib())
        if case.get('profile_dir'):
            held = [state]  # each call donates the state it is given

            def one_call():
                held[0] = train.loop(step_fn, held[0], ctx, batches, train.chunks(0, n, n), 0)
                return held[0]

            summary = measure.profile(one_call, case['profile_dir'])
            if summary:
                print(measure.format_profile(summary), file=sys.stderr)
                result['profile'] = summary
    return result


def main() -> None:
    parser = measure.arguments(__doc__, batch=128)
    parser.add_argument('--remat', nargs='+', default=['none'], help='train.remat')
    parser.add_argument('--n_jitted_steps', type=int, nargs='+', default=[1], help='train.n_jitted_steps')
    parser.add_argument('--dropout', type=float, nargs='+', default=[None], help='default: the recipe (0.15)')
    parser.add_argument('--data', nargs='+', default=['synthetic'], choices=['synthetic', 'real'])
    parser.add_argument('--steps', type=int, default=30, help='timed steps per case')
    parser.add_argument('--processes', type=int, nargs='+', default=[1],
                        help='run each case as P processes of one jax.distributed job (one per GPU group)')
    args = parser.parse_args()
    grid = itertools.product(args.devices, args.batch, args.dtype, args.remat, args.n_jitted_steps, args.dropout,
                             args.data)
    cases = [dict(devices=devices, batch=batch, dtype=dtype, remat=remat, n_jitted_steps=n, dropout=dropout, data=data,
                  steps=args.steps) for devices, batch, dtype, remat, n, dropout, data in grid]
    measure.drive(__file__, args, run_case, cases, COLUMNS, lambda card, rows: (
        f"training throughput, {card['device']} (jax {card['jax']}), "
        f"{rows[0].get('gflop_per_img', 0):.1f} GFLOP per image:"))

if __name__ == '__main__':
    main()
