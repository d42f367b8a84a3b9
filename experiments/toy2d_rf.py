"""1-rectified flow on a toy 2D target (8 Gaussians by default), from standard normal noise.

    python -m flowjax.main --config=experiments/toy2d_rf.py --workdir=runs/toy2d_rf
    python -m flowjax.main --config=experiments/toy2d_rf.py:runlocal --workdir=runs/toy2d_rf_local
    python -m flowjax.main --config=experiments/toy2d_rf.py:target=moons --workdir=runs/moons

Arguments: `runlocal` (a few seconds, for tests), `target=` any toy distribution
(8gaussians, moons, checkerboard, spirals, gmm), `source=` normal or gmm.
"""

from flowjax import configs
from flowjax.methods import table


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, target='8gaussians', source='normal')
    config = table.config('rf')
    config.data.target.name = arg.target
    config.data.source.name = arg.source

    config.model.features = (128, 128, 128)
    config.train.steps = 5000
    config.train.batch_size = 512
    config.train.lr = 2e-3
    config.train.warmup_steps = 200
    config.train.ema_decay = 0.999
    config.train.log_every = 500
    config.train.checkpoint_every = 2000

    if arg.runlocal:
        configs.shrink_toy2d_for_local(config)
        config.eval.samplers = ('euler@1', 'euler@4', 'heun@2', 'rk45')
    return config
