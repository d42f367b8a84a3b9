"""A diffusion teacher (DDPM, eps prediction) on a toy 2D target (8 Gaussians by default), sampled by
DDIM and by solving its probability-flow ODE (docs/methods.md, Diffusion teacher (ddpm)).

    python -m flowjax.main --config=experiments/ddpm_toy2d.py --workdir=runs/ddpm_toy2d
    python -m flowjax.main --config=experiments/ddpm_toy2d.py:runlocal --workdir=runs/ddpm_local
    python -m flowjax.main --config=experiments/ddpm_toy2d.py:schedule=cosine --workdir=runs/ddpm_cosine

Its export (kind 'ddpm') is a teacher like any other: `generate.teacher`, `reflow.online_teacher`,
`eval.models`. Arguments: `runlocal` (seconds, for tests), `target=` any toy distribution
(8gaussians, moons, checkerboard, spirals, gmm), `schedule=` linear or cosine, `timesteps=` T (1000).
"""

from flowjax import configs
from flowjax.methods import table

SAMPLERS = ('ddim@1', 'ddim@4', 'ddim@16', 'euler@16', 'rk45')


def get_config(arg=None):
    """toy2d_rf.py's recipe (network, batch, optimiser) trained as a ddpm model, twice as long."""
    arg = configs.parse_arg(arg, runlocal=False, target='8gaussians', schedule='linear', timesteps=1000)
    config = table.for_method(configs.experiment(__file__, 'toy2d_rf', f'target={arg.target}'), 'ddpm')
    config.ddpm.schedule = arg.schedule
    config.ddpm.timesteps = arg.timesteps
    config.train.steps = 10000
    config.eval.samplers = SAMPLERS

    if arg.runlocal:
        configs.shrink_toy2d_for_local(config)
    return config
