"""Constant acceleration flow on CIFAR-10 (docs/methods.md, CAF): a flowjax 1-RF teacher's 1M couplings,
then 2-RF and CAF on them with the same step budget and training, then FID.

    python -m flowjax.main --workdir=gs://bucket/caf_cifar --config=experiments/caf_cifar.py:data_dir=gs://bucket/tfds,\
inception=weights/pt_inception-2015-12-05-6726825d.pth,vgg=weights/vgg16-397923af.pth \
        --config.teacher.checkpoint=gs://bucket/rf_cifar
    python -m flowjax.main --config=experiments/caf_cifar.py:runlocal,data_dir=... --workdir=runs/quick

Stages, each in `<workdir>/<stage>/`, a rerun skipping finished ones:
  teacher    1-RF, `rf_cifar.py`'s recipe (61.8M); `--config.teacher.checkpoint=` an existing
             export (e.g. an rf_cifar workdir) stands in for it instead
  couplings  1M pairs (x0, the teacher's RK45 solution)
  reflow     2-RF on the couplings, initialised from the teacher
  caf        CAF on the same couplings with the same train section (caf_toy2d.py's `caf_stage` of the 2-RF stage):
             h = 1.5, its velocity network initialised from the teacher (the input layer widened
             with zeros for the velocity slot), t on the grid k / 1000; train.steps counts both
             networks' steps (half each), so the two students have the same budget
  evaluate   FID (50k samples) of the three at Euler 1 and 2 steps, CAF's own update caf@1 and
             caf@2 (NFE 2 and 3) and RK45, and per sampler the coupling preservation of the first
             1000 stored pairs and the reconstruction of 1000 real images (PSNR; LPIPS with `vgg=`)
Both students train with CAF's CIFAR-10 choices where they apply: AdamW lr 1e-4 with weight decay
1e-5 (`train.weight_decay`; b1 0.9, b2 0.999, eps 1e-8), EMA 0.9999, no gradient clipping, global
batch 1280 (`batch=`; it must divide by the device count, as 1280 does for any power of two up to
256), and LPIPS-Huber when `vgg=` gives torchvision's VGG16 weights: the pseudo-Huber term plus LPIPS
of the one-step estimate of x1 (for CAF the Huber term unweighted; for 2-RF weighted by t, as
`flow.loss = 'lpips_huber'` defines for a velocity field). Without `vgg=` both train with
pseudo-Huber alone. Ours, where the methods sheet gives nothing or does not apply: the teacher and
its couplings are flowjax's (rf_cifar's 1-RF and RK45, as in rfpp_cifar.py), both students keep the
teacher's U-Net (they start from its weights) and dropout (0.15), LPIPS at 224x224 with average
pooling and EMA from step 1 (as rfpp_cifar.py), a linear warm-up over 5000 steps, 400,000 steps
(`steps=`; 200,000 per CAF network), and 2-RF on the same optimiser, batch, EMA and loss as CAF
(uniform t), so that the two arms differ in the method only. FID needs pytorch-fid's Inception
weights (`inception=`); without them the pipeline's check stops before any stage runs.
Arguments: `runlocal`, `bf16`, `data_dir=` (tfds data directory; default tfds'), `inception=`,
`vgg=` (weights files), `h=` (1.5), `ivc=` (True), `seed=` (the students', 0), `steps=` and `batch=`
(the students'; 0: 400,000 and 1280, or runlocal's).
`runlocal`: rf_cifar's runlocal teacher (6 steps) with a smaller U-Net still (nf 4, one resolution,
no attention), 48 couplings, 4 student steps, LPIPS at 16x16, no FID: seconds on a CPU, used by the
tests on mock CIFAR-10 (32x32, as the real one).
"""

from flowjax import configs
from flowjax.methods import table

SAMPLERS = ('euler@1', 'euler@2', 'caf@1', 'caf@2', 'rk45')


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, bf16=False, data_dir='', inception='', vgg='', h=1.5, ivc=True,
                            seed=0, steps=0, batch=0)
    teacher = configs.experiment(__file__, 'rf_cifar', ','.join(n for n in ('runlocal', 'bf16') if arg[n]))
    teacher.name = None
    teacher.data.image.data_dir = arg.data_dir or None
    teacher.eval.samplers = ()  # the pipeline's `evaluate` stage scores all models at the end
    if arg.runlocal:  # one resolution, no attention: the U-Net XLA's CPU compiler builds fastest
        teacher.model.update(nf=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())

    couplings = table.for_method(teacher, 'generate')
    couplings.generate.update(teacher='teacher', num_pairs=1_000_000, batch_size=1000, shard_size=10_000,
                              sampler='rk45')

    reflow = table.for_method(teacher, 'reflow')
    reflow.seed = arg.seed
    reflow.reflow.update(couplings='couplings', init='teacher')
    reflow.train.update(steps=400_000, batch_size=1280, lr=1e-4, weight_decay=1e-5, b1=0.9, b2=0.999,
                        adam_eps=1e-8, warmup_steps=5000, lr_final=1.0, grad_clip=0.0, ema_decay=0.9999,
                        ema_warmup=False)
    reflow.flow.loss = 'lpips_huber' if arg.vgg else 'pseudo_huber'
    reflow.lpips.update(resize=224, pool='avg', vgg_weights=arg.vgg or None)

    evaluate = table.for_method(teacher, 'evaluate')
    evaluate.eval.update(models=('teacher', 'reflow', 'caf'), couplings='couplings', metric='fid',
                         inception_weights=arg.inception or None, num_samples=50_000, samplers=SAMPLERS,
                         preservation=1000, reconstruction=1000, lpips=bool(arg.vgg))
    evaluate.lpips.update(resize=224, pool='avg', vgg_weights=arg.vgg or None)  # PSNR, and LPIPS with vgg=

    if arg.runlocal:
        couplings.generate.update(num_pairs=48, batch_size=16, shard_size=32, sampler='euler@4')
        reflow.train.update(steps=4, batch_size=16, warmup_steps=2, log_every=2, checkpoint_every=4)
        reflow.lpips.resize = 16  # the smallest VGG16 takes
        evaluate.eval.update(metric='none', num_samples=32, samplers=('euler@1', 'caf@1'), preservation=8,
                             reconstruction=8)
        evaluate.lpips.resize = 16
    if arg.steps:
        reflow.train.steps = arg.steps
    if arg.batch:
        reflow.train.batch_size = arg.batch
    caf_stage = configs.experiment_module(__file__, 'caf_toy2d').caf_stage(reflow, h=arg.h, ivc=arg.ivc)
    return configs.pipeline(teacher=teacher, couplings=couplings, reflow=reflow, caf=caf_stage, evaluate=evaluate)
