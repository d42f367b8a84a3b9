"""SlimFlow on CIFAR-10 (docs/methods.md, SlimFlow): a small one-step student of a 1-RF teacher.

    python -m flowjax.main --workdir=gs://bucket/slimflow_cifar --config=experiments/slimflow_cifar.py:size=15.7M,\
data_dir=gs://bucket/tfds,inception=weights/pt_inception-2015-12-05-6726825d.pth,vgg=weights/vgg16-397923af.pth
    python -m flowjax.main --config=experiments/slimflow_cifar.py --config.teacher.checkpoint=gs://bucket/rf_cifar ...
    python -m flowjax.main --config=experiments/slimflow_cifar.py:runlocal,data_dir=... --workdir=runs/quick

Stages, each in `<workdir>/<stage>/`, a rerun skipping finished ones:
  teacher    1-RF, the reference recipe of `rf_cifar.py` (61.8M); `--config.teacher.checkpoint=`
             an existing export (e.g. an rf_cifar workdir) stands in for it instead
  couplings  1M pairs (x0, teacher's RK45 solution), float32
  annealed   the student (`size=`: 3.4M, 7.0M, 15.7M or 27.9M parameters; NCSN++ as the paper's)
             from random init by annealing reflow: b linear from 1 to 0 over W = 300,000 steps,
             500,000 steps in all, pairs flipped together at random
  distilled  flow-guided distillation of `annealed` (LPIPS at 64x64, 2-step term weight 1)
  evaluate   FID (50k samples) of the three at 1, 2 NFE and RK45; parameter counts in report.json
Students: Adam 2e-4 (warm-up 5000, clipping 1), batch 128, EMA 0.999999, dropout 0.15 (the
reference's CIFAR config). The distillation's step count is not in the reference; 200,000 here.
Arguments: `size=`, `data_dir=` (tfds data directory; default tfds'), `inception=` (pytorch-fid
weights for FID), `vgg=` (torchvision VGG16 weights for LPIPS), `bf16`, `runlocal` (a tiny U-Net,
a few steps, LPIPS at 16x16 and no FID: seconds on a CPU, used by the tests on mock CIFAR-10).
"""

import copy

from flowjax import configs
from flowjax.methods import table

# Student size -> NCSN++ fields (docs/methods.md, SlimFlow; attention at 16x16 in all four).
SIZES = {
    '3.4M': {'nf': 64, 'ch_mult': (1, 1, 2), 'num_res_blocks': 1},
    '7.0M': {'nf': 64, 'ch_mult': (1, 2, 2), 'num_res_blocks': 2},
    '15.7M': {'nf': 96, 'ch_mult': (1, 2, 2), 'num_res_blocks': 2},
    '27.9M': {'nf': 128, 'ch_mult': (1, 2, 2), 'num_res_blocks': 2},
}


def _size(text):
    try:
        key = f"{float(text.upper().removesuffix('M')):.1f}M"
    except ValueError:
        key = text
    if key not in SIZES:
        raise ValueError(f"config argument size={text!r}: expected one of {', '.join(SIZES)}")
    return SIZES[key]


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, bf16=False, size='15.7M', data_dir='', inception='', vgg='')
    size = _size(arg.size)
    flags = ','.join(name for name in ('runlocal', 'bf16') if arg[name])
    teacher = configs.experiment(__file__, 'rf_cifar', flags)
    teacher.name = None
    teacher.data.image.data_dir = arg.data_dir or None
    teacher.eval.samplers = ()  # the pipeline's `evaluate` stage scores all models at the end

    def stage(method):
        c = table.for_method(teacher, method)
        return c

    couplings = stage('generate')
    couplings.generate.update(teacher='teacher', num_pairs=1_000_000, batch_size=1000, shard_size=10_000,
                              sampler='rk45')

    student = stage('slimflow_reflow')
    if not arg.runlocal:
        student.model.update(size)
    student.slimflow_reflow.couplings = 'couplings'
    student.slimflow_reflow.beta.update(schedule='linear', steps=300_000)
    student.train.steps = 500_000

    distill = stage('slimflow_distill')
    distill.model = copy.deepcopy(student.model)
    distill.slimflow_distill.update(couplings='couplings', guidance=1.0)
    distill.flow.loss = 'lpips'
    distill.lpips.update(resize=64, vgg_weights=arg.vgg or None)
    distill.train.steps = 200_000

    evaluate = stage('evaluate')
    evaluate.eval.update(metric='fid', inception_weights=arg.inception or None, num_samples=50_000,
                         samplers=('euler@1', 'euler@2', 'rk45'))
    evaluate.eval.couplings = 'couplings'

    if arg.runlocal:
        couplings.generate.update(num_pairs=48, batch_size=16, shard_size=32, sampler='euler@4')
        for c in (student, distill):
            c.model.update(nf=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
            c.train.update(steps=4, checkpoint_every=4)
        student.slimflow_reflow.beta.steps = 2
        distill.lpips.resize = 16  # the smallest VGG16 takes
        evaluate.eval.update(metric='none', num_samples=32, samplers=('euler@1',))
    return configs.slimflow_pipeline(teacher, couplings, student, distill, evaluate)
