"""Coupling-pass throughput: the `generate` method's ODE solve of the rectified-flow CIFAR-10
teacher (experiments/rf_cifar.py: DDPM++, 61.8M parameters) with fixed-step Euler.

    python benchmarks/coupling_pass.py --batch 1024 2048 --dtype bfloat16 float32
    python benchmarks/coupling_pass.py --batch 1024 --pass   # also the whole pass, shards written
    python benchmarks/coupling_pass.py --batch 1024 --sampler euler@32 rk45 --pass --in_flight 1 2

Each case runs in its own process. A randomly initialised teacher is exported, loaded through
generate.prepare, and its pair solver (generate's jitted, sharded per-pair solve) is timed on
random noise: img*NFE/s counts network evaluations of single images, MFU is the forward's model
FLOPs over the card's measured bf16 matrix rate. `--pass` also runs generate.generate_couplings
end to end on `--pass_shards` shards of `batch` pairs (drawing, solving, writing .npz shards): one
call writes the first shard (it compiles), a second call, timed whole (loading the teacher, every
shard, the manifest), writes the rest; `pass/solver` is its rate over the solver's, `loop/solver`
the same for the shard loop alone once its first shard is on the host (what overlap can reach). `--in_flight`
sets how many shards the pass keeps queued on the devices (generate._IN_FLIGHT; 1: the device
waits while the host fetches each shard, as before the overlapped pass). Prints one markdown table.
"""

import itertools
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import measure  # noqa: E402

COLUMNS = (('devices', 'devices', ''), ('batch', 'batch', ''), ('dtype', 'dtype', ''), ('sampler', 'sampler', ''),
           ('img_nfe_per_s', 'img*NFE/s', ',.0f'), ('mfu', 'MFU', '.1%'),
           ('in_flight', 'in flight', ''), ('pass_img_nfe_per_s', 'pass img*NFE/s', ',.0f'),
           ('pass_ratio', 'pass/solver', '.3f'), ('loop_ratio', 'loop/solver', '.3f'),
           ('hours_1m_127', 'h for 1M pairs @127', '.2f'), ('peak_gib', 'peak GiB', '.1f'),
           ('compile_s', 'compile s', '.0f'), ('note', 'note', ''))


def run_case(case: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from flowjax import checkpoint, generate, sharding, train
    from flowjax.data import couplings
    from flowjax.methods import table
    from flowjax.models import kinds

    config = table.for_method(measure.experiment(case.get('experiment', 'rf_cifar'), case.get('arg')), 'generate')
    shape = (32, 32, 3)
    kind = kinds.from_config(config)
    mesh = sharding.data_mesh(jax.devices()[:case['devices']])
    with tempfile.TemporaryDirectory() as tmp:
        teacher = pathlib.Path(tmp) / 'teacher'
        zeros = jnp.zeros((1, *shape)), jnp.zeros((1,))  # parameters only: no optimiser state on the device
        params = jax.jit(kind.module.init)(jax.random.key(config.seed, impl='rbg'), *zeros)
        checkpoint.export(teacher, params, train.export_meta(config, kind, shape, 0))
        del params

        images = pathlib.Path(tmp) / 'images.npz'  # only the shape matters: the pass starts from noise
        np.savez(images, images=np.zeros((1, *shape), np.uint8))
        config.data.image = {'name': 'npz', 'path': str(images)}
        config.generate.update(teacher=str(teacher), sampler=case['sampler'], batch_size=case['batch'],
                               shard_size=case['batch'], num_pairs=case['pass_shards'] * case['batch'],
                               model_dtype=case['dtype'])
        job = generate.prepare(config, mesh)
        eps = job.manifest['t_eps']
        solve = generate.pair_solver(job.kind, job.sampler, eps, True, mesh)
        rows = NamedSharding(mesh, P('data'))
        params = jax.device_put(job.params, NamedSharding(mesh, P()))
        x = jax.device_put(measure.host_array((case['batch'], *shape)), rows)
        label = jax.device_put(np.zeros(case['batch'], np.int32), rows)
        started = time.perf_counter()
        compiled = solve.lower(params, x, label).compile()
        compile_s = time.perf_counter() - started
        seconds = measure.median_seconds(lambda: compiled(params, x, label), warmup=2, repeats=case['repeats'])
        nfe = int(compiled(params, x, label)[1][0])  # the solver's own count of network calls per pair
        rate = case['batch'] * nfe / seconds
        forward = measure.flops(kind.module.apply, params, *zeros)
        result = {**case, 'img_nfe_per_s': rate, 'compile_s': compile_s, 'gflop_per_nfe': forward / 1e9,
                  'mfu': rate * forward / (case['peak_tflops'] * 1e12 * case['devices']),
                  'hours_1m_127': 1e6 * 127 / rate / 3600}
        if case.get('profile_dir'):
            summary = measure.profile(lambda: compiled(params, x, label), case['profile_dir'], calls=1)
            if summary:
                result['profile'] = summary
        if case.get('pass'):
            generate._IN_FLIGHT = case['in_flight']
            store = pathlib.Path(tmp) / 'couplings'
            config.generate.max_new_shards = 1
            generate.generate_couplings(config, store, devices=mesh.devices.flat)  # compiles
            config.generate.max_new_shards = None
            summary = generate.generate_couplings(config, store, devices=mesh.devices.flat)
            written = couplings.open_store(store).load()['nfe']
            result['pass_img_nfe_per_s'] = int(written[case['batch']:].sum()) / summary['seconds']
            result['pass_ratio'] = result['pass_img_nfe_per_s'] / rate
            timing = summary['timing']  # the loop once its first shard is on the host: the overlap alone
            steady = int(written[2 * case['batch']:].sum()) / (timing['loop'] - timing['first_shard'])
            result.update(loop_img_nfe_per_s=steady, loop_ratio=steady / rate, pass_timing=timing,
                          pass_seconds=summary['seconds'])
        result['peak_gib'] = measure.peak_memory_gib()
    return result


def main() -> None:
    parser = measure.arguments(__doc__, batch=1024)
    parser.add_argument('--sampler', nargs='+', default=['euler@32'])
    parser.add_argument('--repeats', type=int, default=5, help='timed calls per case (the median is kept)')
    parser.add_argument('--pass', dest='whole_pass', action='store_true', help='also time generate_couplings')
    parser.add_argument('--pass_shards', type=int, default=8, help='shards of `batch` pairs the pass writes')
    parser.add_argument('--in_flight', type=int, nargs='+', default=[2], help='generate._IN_FLIGHT of the pass')
    args = parser.parse_args()
    grid = itertools.product(args.devices, args.batch, args.dtype, args.sampler,
                             args.in_flight if args.whole_pass else [None])
    cases = [{'devices': devices, 'batch': batch, 'dtype': dtype, 'sampler': sampler, 'repeats': args.repeats,
              'pass': args.whole_pass, 'pass_shards': args.pass_shards, 'in_flight': in_flight}
             for devices, batch, dtype, sampler, in_flight in grid]
    measure.drive(__file__, args, run_case, cases, COLUMNS, lambda card, rows: (
        f"coupling pass, {card['device']} (jax {card['jax']}), "
        f"{rows[0].get('gflop_per_nfe', 0):.1f} GFLOP per image per NFE:"))

if __name__ == '__main__':
    main()
