"""PeRFlow on CIFAR-10 (docs/methods.md, PeRFlow): a flowjax teacher, PeRFlow students with K = 4 and
K = 1 windows started from its weights, then FID.

    python -m flowjax.main --workdir=gs://bucket/perflow_cifar --config=experiments/perflow_cifar.py:data_dir=gs://bucket/tfds,\
inception=weights/pt_inception-2015-12-05-6726825d.pth --config.teacher.checkpoint=gs://bucket/rf_cifar
    python -m flowjax.main --config=experiments/perflow_cifar.py:teacher=ddpm,data_dir=... --workdir=runs/perflow_ddpm
    python -m flowjax.main --config=experiments/perflow_cifar.py:runlocal,data_dir=... --workdir=runs/quick

Stages, each in `<workdir>/<stage>/`, a rerun skipping finished ones:
  teacher    `rf_cifar.py`'s 1-RF recipe (61.8M), or with `teacher=ddpm` a DDPM eps teacher of the
             same U-Net and training (linear betas 1e-4 to 0.02, T = 1000; docs/methods.md,
             Diffusion teacher (ddpm)); `--config.teacher.checkpoint=` an existing export stands in
  k4         PeRFlow, K = 4 windows, pairs solved per batch: real images noised to the window's
             start by the teacher's forward process, the teacher solved 8 steps per window (Euler for
             rf, DDIM for ddpm); velocity parameterisation for rf, `diff_eps` for ddpm (`param=`)
  k1         the same with one window (one-window reflow with online pairs, 32 teacher steps)
  evaluate   FID (50k samples) of the three with the windowed sampler at 1, 4 and 8 steps and the
             teacher's RK45 (DDIM 32 steps for ddpm) reference
The students follow PeRFlow's SD1.5 recipe where it applies: AdamW 8e-5 constant after a 500-step
warm-up, weight decay 1e-2, gradient clipping 1, EMA (0.9999 from step 1); ours, where the methods
sheet gives nothing for CIFAR: batch 128, 100,000 steps (`steps=`), the teacher's dropout (0.15).
FID needs pytorch-fid's Inception weights (`inception=`); without them the pipeline's check stops
before any stage runs.
Arguments: `runlocal`, `bf16`, `teacher=` (rf, ddpm), `data_dir=`, `inception=`, `param=`,
`seed=` (0), `steps=`, `batch=`.
`runlocal`: rf_cifar's runlocal teacher with a smaller U-Net still (nf 4, one resolution, no
attention), 4 student steps, no FID: seconds on a CPU, used by the tests on mock CIFAR-10.
"""

from flowjax import configs
from flowjax.methods import table

PER_WINDOW = 8


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, bf16=False, teacher='rf', data_dir='', inception='', param='',
                            seed=0, steps=0, batch=0)
    if arg.teacher not in ('rf', 'ddpm'):
        raise ValueError(f'config argument teacher={arg.teacher!r}: expected rf or ddpm')
    teacher = configs.experiment(__file__, 'rf_cifar', ','.join(n for n in ('runlocal', 'bf16') if arg[n]))
    teacher.name = None
    teacher.data.image.data_dir = arg.data_dir or None
    teacher.eval.samplers = ()  # the pipeline's `evaluate` stage scores all models at the end
    if arg.runlocal:  # one resolution, no attention: the U-Net XLA's CPU compiler builds fastest
        teacher.model.update(nf=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=())
    if arg.teacher == 'ddpm':
        teacher = table.for_method(teacher, 'ddpm')
    solver = 'euler' if arg.teacher == 'rf' else 'ddim'
    param = arg.param or ('velocity' if arg.teacher == 'rf' else 'diff_eps')

    students = {}
    for windows in (4, 1):
        c = table.for_method(teacher, 'perflow')
        c.seed = arg.seed
        c.perflow.update(teacher='teacher', windows=windows, teacher_sampler=f'{solver}@{PER_WINDOW * 4 // windows}',
                         parameterization=param)
        c.train.update(steps=100_000, batch_size=128, lr=8e-5, weight_decay=1e-2, warmup_steps=500, lr_final=1.0,
                       grad_clip=1.0, ema_decay=0.9999, ema_warmup=False)
        if arg.runlocal:
            c.train.update(steps=4, batch_size=16, warmup_steps=2, log_every=2, checkpoint_every=4)
            c.perflow.teacher_sampler = f'{solver}@{4 // windows}'
        if arg.steps:
            c.train.steps = arg.steps
        if arg.batch:
            c.train.batch_size = arg.batch
        students[f'k{windows}'] = c

    evaluate = table.for_method(teacher, 'evaluate')
    reference = 'rk45' if arg.teacher == 'rf' else 'ddim@32'
    evaluate.eval.update(models=('teacher', 'k4', 'k1'), metric='fid', inception_weights=arg.inception or None,
                         num_samples=50_000, samplers=('euler@1', 'euler@4', 'euler@8', reference))
    if arg.runlocal:
        evaluate.eval.update(metric='none', num_samples=32, samplers=('euler@1', 'euler@4'))
    return configs.pipeline(teacher=teacher, **students, evaluate=evaluate)
