"""How fast the host feeds training: the real image pipeline alone (shuffled reads, random flips,
float conversion, the transfer to the devices, read-ahead in a background thread), with no model.

    python benchmarks/input_pipeline.py --batch 128 512

Builds `datasets.make_batches` on 50,000 random uint8 32x32x3 images in an .npz (CIFAR-10's size)
and times `--steps` batches through train.loop's reader (stream.read_ahead with the recipe's
train.prefetch), waiting for each batch to reach the devices. If this rate is well above the
training rate of a card (benchmarks/RESULTS.md), the loop cannot stall on input. Prints one table.
"""

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import measure  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, nargs='+', default=[128, 512])
    parser.add_argument('--steps', type=int, default=200)
    args = parser.parse_args()

    import jax
    import numpy as np

    from flowjax import sharding
    from flowjax.data import datasets, stream

    config = measure.experiment('rf_cifar')
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / 'images.npz'
        np.savez(path, images=np.random.default_rng(0).integers(0, 256, (50_000, 32, 32, 3), np.uint8))
        config.data.image = {'name': 'npz', 'path': str(path)}
        mesh = sharding.data_mesh()
        for batch in args.batch:
            batches = datasets.make_batches(config, mesh, batch, config.seed)
            jax.block_until_ready(batches(0))
            started = time.perf_counter()
            for got in stream.read_ahead(lambda s: batches(s), list(range(1, args.steps + 1)), config.train.prefetch):
                jax.block_until_ready(got)
            seconds = time.perf_counter() - started
            rows.append({'batch': batch, 'img_per_s': args.steps * batch / seconds,
                         'ms_per_batch': 1e3 * seconds / args.steps})
    print(f'\ninput pipeline alone, {measure.device_name()} ({len(mesh.devices.flat)} devices):')
    columns = (('batch', 'batch', ''), ('img_per_s', 'img/s', ',.0f'), ('ms_per_batch', 'ms/batch', '.2f'))
    print(measure.table(rows, columns))


if __name__ == '__main__':
    main()
