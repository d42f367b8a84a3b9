"""rfpp on CIFAR-10: one reflow round of a flowjax 1-RF teacher, trained with rfpp's recipe
(docs/methods.md, rfpp).

    python -m flowjax.main --config=experiments/rfpp_cifar.py --workdir=gs://bucket/rfpp_cifar \
        --config.teacher.checkpoint=gs://bucket/rf_cifar \
        --config.student.lpips.vgg_weights=weights/vgg16-397923af.pth \
        --config.evaluate.eval.inception_weights=weights/pt_inception-2015-12-05-6726825d.pth
    python -m flowjax.main --config=experiments/rfpp_cifar.py:runlocal --workdir=runs/rfpp_local

Stages: `teacher` (rf_cifar.py; point `teacher.checkpoint` at a trained export to skip it),
`couplings` (1M pairs of the teacher, rk45), `student` initialised from the teacher's weights and
trained as the paper trains its CIFAR model: batch 512, Adam 2e-4 (0.9, 0.999, 1e-8), warm-up
5000, no clipping, EMA 0.9999 from step 1 (no warm-up rule), 800k steps, U-shaped t (a = 4), and
LPIPS-Huber `t H + LPIPS(x1_hat, x1) / max(1 - t, lpips_t_min)` (config F) with LPIPS on VGG16
with average pooling at 224x224. The paper divides by s = 1 - t unclamped; here the clamp is
1e-5, the smallest 1 - t the U-shaped rescale gives, so the two agree. The paper initialises from
an EDM denoiser and makes pairs with EDM's sampler; flowjax has no EDM network, so both come from
the flowjax teacher. `evaluate` scores FID (50k samples) at 1 and 2 Euler steps.
Arguments: `runlocal`, `bf16`, `data_dir=`, `inception=`, `vgg=` (weights files).
"""

from flowjax import configs
from flowjax.methods import table


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, bf16=False, data_dir='', inception='', vgg='')
    teacher = configs.experiment(__file__, 'rf_cifar', ','.join(n for n in ('runlocal', 'bf16') if arg[n]))
    teacher.name = None
    teacher.data.image.data_dir = arg.data_dir or None
    teacher.eval.samplers = ()

    couplings = table.for_method(teacher, 'generate')
    couplings.generate.update(teacher='teacher', num_pairs=1_000_000, batch_size=1000, shard_size=10_000,
                              sampler='rk45')

    student = table.for_method(teacher, 'reflow')
    student.reflow.update(couplings='couplings', init='teacher')
    student.train.update(steps=800_000, batch_size=512, lr=2e-4, b1=0.9, b2=0.999, adam_eps=1e-8,
                         warmup_steps=5000, grad_clip=0.0, ema_decay=0.9999, ema_warmup=False)
    student.flow.update(time='u_shaped', u_shape_a=4.0, loss='lpips_huber', lpips_t_min=1e-5)
    student.lpips.update(pool='avg', resize=224, vgg_weights=arg.vgg or None)

    evaluate = table.for_method(teacher, 'evaluate')
    evaluate.eval.update(models=('teacher', 'student'), couplings='couplings', metric='fid',
                         inception_weights=arg.inception or None, num_samples=50_000,
                         samplers=('euler@1', 'euler@2'))

    if arg.runlocal:
        couplings.generate.update(num_pairs=48, batch_size=16, shard_size=32, sampler='euler@4')
        student.train.update(steps=4, batch_size=16, warmup_steps=2, log_every=2, checkpoint_every=4)
        student.lpips.resize = 16  # the smallest VGG16 takes
        evaluate.eval.update(metric='none', num_samples=32, samplers=('euler@1',))
    return configs.pipeline(teacher=teacher, couplings=couplings, student=student, evaluate=evaluate)
