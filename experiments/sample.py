"""Samples of an exported model for external metric tools (docs/methods.md, Sample job): samples.npz (images
uint8 NHWC, or toy points float32; labels of a class-conditional model) and samples.png.

    python -m flowjax.main --config=experiments/sample.py:checkpoint=runs/rf_cifar/teacher \
        --workdir=runs/rf_cifar_samples
    python -m flowjax.main --config=experiments/sample.py --config.sample.checkpoint=runs/rf_cifar/teacher/export \
        --config.sample.sampler=euler@8 --workdir=runs/rf_cifar_euler8
    python -m flowjax.main --config=experiments/sample.py:runlocal,checkpoint=runs/quick/teacher --workdir=runs/q

The checkpoint is an export directory or the workdir holding it (`--config.sample.checkpoint=` overrides the
argument). Arguments: `checkpoint=`, `count=` samples (50000; runlocal 256), `sampler=` (rk45; runlocal
euler@4), `runlocal` (256 samples in chunks of 64). A class-conditional model's labels and guidance:
`--config.sample.labels=3` (or `'(0,1,2)'`, cycled; default 'uniform') and `--config.sample.guidance=2.0`.
"""

from flowjax import configs
from flowjax.methods import table


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, checkpoint='', count=0, sampler='')
    config = table.config('sample')
    if arg.checkpoint:
        config.sample.checkpoint = arg.checkpoint
    if arg.runlocal:
        config.sample.update(count=256, batch_size=64, sampler='euler@4')
    if arg.count:
        config.sample.count = arg.count
    if arg.sampler:
        config.sample.sampler = arg.sampler
    return config
