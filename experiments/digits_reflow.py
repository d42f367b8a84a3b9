"""The reflow pipeline on the embedded 8x8 digits (no download): teacher -> couplings -> 2-RF -> one-step distill.

    python -m flowjax.main --config=experiments/digits_reflow.py --workdir=runs/digits_reflow
    python -m flowjax.main --config=experiments/digits_reflow.py:runlocal --workdir=runs/quick

A small NCSN++ U-Net learns scikit-learn's 1797 digits (8x8x1, scaled to [-1, 1], random
horizontal flips). Stages run in `<workdir>/<stage>/`; a rerun skips finished ones. The final
`evaluate` stage scores the three models with `fd_digits` (Frechet distance in the features of
the classifier shipped with flowjax) at 1, 2 and 4 Euler steps and a 32-step reference, and writes
`<workdir>/report.md` and `samples.png`; `couplings/couplings.png` shows the teacher's pairs.
Arguments: `runlocal` (a one-resolution U-Net without attention, nf 8, a few steps: seconds on a CPU,
for tests), `nf=` U-Net width, `pairs=` number of couplings, `steps=` teacher steps.
"""

from flowjax import configs
from flowjax.methods import table


def _stage(method, arg):
    c = table.config(method)
    c.name = None
    c.seed = 0
    c.data.kind = 'image'
    c.data.image = {'name': 'digits'}
    c.data.flip = True
    c.model = {'name': 'ncsnpp', 'nf': arg.nf, 'ch_mult': (1, 2), 'num_res_blocks': 1,
               'attn_resolutions': (4,), 'dropout': 0.0}
    c.train.batch_size = 128
    c.train.lr = 2e-3
    c.train.warmup_steps = 200
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.999
    c.train.log_every = 100
    c.train.checkpoint_every = 500
    c.eval.samplers = ()  # the pipeline's `evaluate` stage compares all models at the end
    c.eval.batch_size = 500
    c.eval.num_samples = 1000
    if arg.runlocal:  # one resolution, no attention: the U-Net XLA's CPU compiler builds fastest
        c.model.update(nf=8, ch_mult=(1,), attn_resolutions=())
        c.train.batch_size = 16
        c.train.log_every = 5
        c.train.checkpoint_every = 10
        c.eval.batch_size = 64
        c.eval.num_samples = 128
        c.eval.straightness_steps = 8
        c.eval.grid = 16
    return c


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, nf=16, pairs=3000, steps=2000)
    pairs = 64 if arg.runlocal else arg.pairs

    teacher = _stage('rf', arg)
    teacher.train.steps = 12 if arg.runlocal else arg.steps
    teacher.train.lr_final = 0.05  # cosine decay: a sharper teacher in a short run

    couplings = _stage('generate', arg)
    couplings.generate.teacher = 'teacher'
    couplings.generate.num_pairs = pairs
    couplings.generate.batch_size = min(pairs, 1000)
    couplings.generate.shard_size = min(pairs, 1000)
    couplings.generate.sampler = 'euler@8' if arg.runlocal else 'euler@32'

    reflow = _stage('reflow', arg)
    reflow.reflow.couplings = 'couplings'
    reflow.reflow.init = 'teacher'
    reflow.train.steps = 12 if arg.runlocal else 1000
    reflow.train.lr = 5e-4

    distill = _stage('distill', arg)
    distill.distill.couplings = 'couplings'
    distill.distill.init = 'reflow'
    distill.distill.k = 1
    distill.flow.loss = 'l2'
    distill.train.steps = 12 if arg.runlocal else 500
    distill.train.lr = 2e-4

    evaluate = _stage('evaluate', arg)
    evaluate.eval.models = ('teacher', 'reflow', 'distill')
    evaluate.eval.couplings = 'couplings'
    evaluate.eval.samplers = ('euler@1', 'euler@2', 'euler@4', 'euler@8' if arg.runlocal else 'euler@32')

    return configs.pipeline(teacher=teacher, couplings=couplings, reflow=reflow, distill=distill,
                            evaluate=evaluate)
