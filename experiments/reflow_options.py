"""Ablation of the rfpp and Simple ReFlow training options: one teacher, one coupling store, one
step budget, several seeds per arm, each arm changing ONE thing against plain 2-RF.

    python -m flowjax.main --config=experiments/reflow_options.py:data=moons --workdir=runs/options_moons
    python -m flowjax.main --config=experiments/reflow_options.py:data=digits --workdir=runs/options_digits
    python -m flowjax.main --config=experiments/reflow_options.py:data=digits,vgg=weights/vgg16-397923af.pth ...
    python -m flowjax.main --config=experiments/reflow_options.py:runlocal --workdir=runs/quick

The teacher and couplings are those of `toy2d_reflow.py` (data=moons) or `digits_reflow.py`
(data=digits). Every arm is a reflow student initialised from the teacher on those couplings,
trained with the same steps, learning rate and EMA as the recipe's 2-RF, with seeds 0 .. seeds-1:

    reflow        2-RF: uniform t, L2 (the baseline every difference is taken against)
    u_shaped      rfpp's U-shaped time density (a = 4)
    pseudo_huber  rfpp's pseudo-Huber loss (c = 0.00054 d)
    lpips_huber   rfpp's LPIPS-Huber (digits with `vgg=`: VGG16 average pooling at 32x32)
    normalized    Simple ReFlow's per-sample normalisation L / stopgrad(L)
    exp10         Simple ReFlow's time density proportional to 10^{t_noise}
    forward_backward  Simple ReFlow's forward pairs: half of every batch from a second store of
                  real data inverted by the teacher (stage `forward_pairs`, as many pairs as the couplings)

The evaluate stage scores every student at 1 and 2 Euler steps (w2 on moons, fd_digits on
digits), summarises each arm over its seeds (`eval.groups`) and gives the paired differences of
each arm against 2-RF seed by seed (`eval.differences`: same seed, same batches of pairs).
Arguments: `runlocal`, `data=` (moons, digits), `seeds=` (3), `steps=` (student steps; the
recipe's by default), `vgg=` (torchvision's VGG16 weights file: adds the lpips_huber arm),
`arms=` (a subset joined by '+', e.g. `arms=reflow+forward_backward`; 2-RF is always run).
"""

from flowjax import configs
from flowjax.methods import table

# arm -> the config.flow fields it changes against 2-RF
ARMS = {
    'reflow': {},
    'u_shaped': {'time': 'u_shaped', 'u_shape_a': 4.0},
    'pseudo_huber': {'loss': 'pseudo_huber'},
    'lpips_huber': {'loss': 'lpips_huber'},
    'normalized': {'normalize': True},
    'exp10': {'time': 'exp10'},
    'forward_backward': {},  # the same objective as 2-RF; the second store makes the difference
}
FORWARD_FRACTION = 0.5  # forward_backward: the fraction of every batch drawn from the forward pairs
BASELINE = 'reflow'


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, data='moons', seeds=3, steps=0, vgg='', arms='')
    if arg.data not in ('moons', 'digits'):
        raise ValueError(f"config argument data={arg.data!r}: expected moons or digits")
    if arg.runlocal:
        recipe = configs.experiment(__file__, 'toy2d_reflow' if arg.data == 'moons' else 'digits_reflow', 'runlocal')
    elif arg.data == 'moons':
        recipe = configs.experiment(__file__, 'toy2d_reflow', 'target=moons')
    else:
        recipe = configs.experiment(__file__, 'digits_reflow')
    chosen = set(arg.arms.split('+')) if arg.arms else set(ARMS)
    unknown = sorted(chosen - set(ARMS))
    if unknown:
        raise ValueError(f"config argument arms: unknown arm {unknown[0]!r} (expected {', '.join(ARMS)})")
    with_lpips = bool(arg.vgg) and arg.data == 'digits'
    arms = [a for a in ARMS if (a in chosen or a == BASELINE) and (a != 'lpips_huber' or with_lpips)]
    stages = {'teacher': recipe.teacher, 'couplings': recipe.couplings}
    if 'forward_backward' in arms:
        forward = table.for_method(recipe.couplings, 'generate')
        forward.generate.direction = 'forward'
        stages['forward_pairs'] = forward
    for arm in arms:
        for seed in range(arg.seeds):
            c = table.for_method(recipe.reflow, 'reflow')
            c.seed = seed
            c.flow.update(ARMS[arm])
            if arg.steps:
                c.train.steps = arg.steps
            if arm == 'lpips_huber':
                c.lpips.update(vgg_weights=arg.vgg, pool='avg', resize=32)
            if arm == 'forward_backward':
                c.reflow.update(mix_couplings='forward_pairs', mix_fraction=FORWARD_FRACTION)
            stages[f'{arm}_s{seed}'] = c
    evaluate = recipe.evaluate
    evaluate.eval.models = tuple(name for name in stages if name not in ('couplings', 'forward_pairs'))
    evaluate.eval.samplers = ('euler@1', 'euler@2')
    evaluate.eval.groups = {arm: tuple(f'{arm}_s{s}' for s in range(arg.seeds)) for arm in arms}
    evaluate.eval.differences = {f'{arm} - {BASELINE}': (arm, BASELINE) for arm in arms if arm != BASELINE}
    return configs.pipeline(**stages, evaluate=evaluate)
