"""1-rectified flow on CIFAR-10: the reference recipe (DDPM++ U-Net, 61.8M parameters).

    python -m flowjax.main --config=experiments/rf_cifar.py --workdir=gs://bucket/rf_cifar \
        --config.eval.inception_weights=/path/to/pt_inception-2015-12-05-6726825d.pth
    python -m flowjax.main --config=experiments/rf_cifar.py:runlocal --workdir=runs/rf_cifar_local

Reads CIFAR-10 prepared by tfds in array_record format (README: "Image datasets"); set
`--config.data.image.data_dir=` when it is not in tfds' default directory. The recipe: Adam 2e-4
(b1 0.9, eps 1e-8), linear warm-up over 5000 steps, global-norm clipping 1, batch 128, EMA
0.999999 with the warm-up rule min(decay, (1 + n) / (10 + n)), dropout 0.15, random flips,
t ~ U[1e-3, 1]. At the end the EMA weights are exported and scored with FID (50k samples, RK45
and few-step Euler), which needs pytorch-fid's Inception weights file (`eval.inception_weights`).
`runlocal` shrinks everything (a tiny U-Net, a few steps, no FID) to run on a CPU in seconds;
`bf16` computes activations in bfloat16 (parameters and optimiser stay float32).
"""

from ml_collections import config_dict

from flowjax import configs
from flowjax.methods import table


def get_config(arg=None):
    arg = configs.parse_arg(arg, runlocal=False, bf16=False)
    c = table.config('rf')
    c.name = 'rf_cifar'
    c.seed = 0

    c.data.kind = 'image'
    c.data.image = {'name': 'tfds', 'dataset': 'cifar10', 'split': 'train', 'data_dir': config_dict.placeholder(str)}
    c.data.flip = True

    c.model = {
        'name': 'ncsnpp', 'nf': 128, 'ch_mult': (1, 2, 2, 2), 'num_res_blocks': 4, 'attn_resolutions': (16,),
        'dropout': 0.15, 'resblock_type': 'biggan', 'embedding_type': 'positional', 'skip_rescale': True,
        'init_scale': 0.0, 'dtype': 'bfloat16' if arg.bf16 else 'float32',
    }
    c.flow.t_eps = 1e-3

    c.train.steps = 800_000
    c.train.batch_size = 128
    c.train.lr = 2e-4
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.warmup_steps = 5000
    c.train.lr_final = 1.0
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.999999
    c.train.log_every = 1000
    c.train.checkpoint_every = 10_000
    c.train.keep_checkpoints = 3

    c.eval.metric = 'fid'
    c.eval.samplers = ('euler@1', 'euler@2', 'euler@8', 'rk45')
    c.eval.num_samples = 50_000
    c.eval.batch_size = 1000
    c.eval.straightness_steps = 100

    if arg.runlocal:
        c.model.update(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0)  # compiles fastest
        c.train.steps = 6
        c.train.batch_size = 16
        c.train.warmup_steps = 2
        c.train.log_every = 2
        c.train.checkpoint_every = 3
        c.eval.metric = 'none'  # FID needs the Inception weights file; runlocal scores nothing
        c.eval.samplers = ('euler@1',)
        c.eval.num_samples = 32
        c.eval.batch_size = 16
        c.eval.straightness_steps = 4
        c.eval.grid = 16
    return c
