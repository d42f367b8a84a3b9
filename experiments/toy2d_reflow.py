"""The reflow pipeline on a toy 2D target (two moons by default): 1-RF teacher -> couplings -> 2-RF -> one-step distill.

    python -m flowjax.main --config=experiments/toy2d_reflow.py --workdir=runs/toy2d_reflow
    python -m flowjax.main --config=experiments/toy2d_reflow.py:runlocal --workdir=runs/quick

Stages run in `<workdir>/<stage>/`; a rerun skips finished stages. The final `evaluate` stage
compares the three models at the same NFE and writes `<workdir>/report.md` and `samples.png`.
Arguments: `runlocal`, `target=` (8gaussians, moons, checkerboard, spirals, gmm),
`pairs=` number of couplings.
"""

from flowjax import configs
from flowjax.methods import table


def _stage(method, arg):
    c = table.config(method)
    c.name = None
    c.seed = 0
    c.data.target.name = arg.target
    c.model.features = (128, 128, 128)
    c.train.batch_size = 512
    c.train.warmup_steps = 200
    c.train.log_every = 500
    c.train.checkpoint_every = 2000
    c.eval.samplers = ()  # the pipeline's `evaluate` stage compares all models at the end
    return configs.shrink_toy2d_for_local(c) if arg.runlocal else c


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, target='moons', pairs=10_000)
    pairs = 512 if arg.runlocal else arg.pairs
    steps = 40 if arg.runlocal else None

    teacher = _stage('rf', arg)
    teacher.train.steps = steps or 4000
    teacher.train.lr = 2e-3

    couplings = _stage('generate', arg)
    couplings.generate.teacher = 'teacher'
    couplings.generate.num_pairs = pairs
    couplings.generate.batch_size = min(pairs, 4000)
    couplings.generate.shard_size = min(pairs, 4000)
    couplings.generate.sampler = 'rk45'

    reflow = _stage('reflow', arg)
    reflow.reflow.couplings = 'couplings'
    reflow.reflow.init = 'teacher'
    reflow.train.steps = steps or 3000
    reflow.train.lr = 1e-3

    distill = _stage('distill', arg)
    distill.distill.couplings = 'couplings'
    distill.distill.init = 'reflow'
    distill.distill.k = 1
    distill.flow.loss = 'l2'
    distill.train.steps = steps or 1500
    distill.train.lr = 5e-4

    evaluate = _stage('evaluate', arg)
    evaluate.eval.models = ('teacher', 'reflow', 'distill')
    evaluate.eval.couplings = 'couplings'
    evaluate.eval.samplers = ('euler@1', 'euler@2', 'euler@4', 'rk45')

    config = configs.pipeline(teacher=teacher, couplings=couplings, reflow=reflow, distill=distill,
                              evaluate=evaluate)
    return config
