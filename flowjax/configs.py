"""The fields every experiment starts from, and the `:arg` parser of experiment files.

An experiment file's `get_config(arg)` starts from `base()`, sets what it needs, and
returns the config; main locks it, so a typo in an override is an error.
"""

import ml_collections
from ml_collections import config_dict


def base() -> ml_collections.ConfigDict:
    """Defaults shared by all experiments; experiment files override them."""
    c = ml_collections.ConfigDict()
    c.method = 'rf'
    c.name = config_dict.placeholder(str)  # the model's name in reports; defaults to the method
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.kind = 'toy2d'
    c.data.target = ml_collections.ConfigDict({'name': '8gaussians'})
    c.data.source = ml_collections.ConfigDict({'name': 'normal'})

    c.model = ml_collections.ConfigDict()
    c.model.name = 'mlp'
    c.model.features = (256, 256, 256)
    c.model.time_dim = 64
    c.model.dropout = 0.0

    c.flow = ml_collections.ConfigDict()
    c.flow.t_eps = 1e-3  # training t ~ U[eps, 1]; sampling integrates from eps to 1

    c.train = ml_collections.ConfigDict()
    c.train.steps = 10_000
    c.train.batch_size = 512
    c.train.lr = 1e-3
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.adam_eps = 1e-8
    c.train.warmup_steps = 500
    c.train.grad_clip = 1.0  # global-norm clipping; 0 disables
    c.train.ema_decay = 0.999
    c.train.log_every = 500
    c.train.checkpoint_every = 2_000
    c.train.keep_checkpoints = 2

    c.eval = ml_collections.ConfigDict()
    c.eval.samplers = ('euler@1', 'euler@2', 'euler@4', 'euler@8', 'heun@4', 'rk45')
    c.eval.num_samples = 2000
    c.eval.rtol = 1e-5
    c.eval.atol = 1e-5
    c.eval.straightness_steps = 100
    c.eval.trajectories = 16
    return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses 'runlocal,size=7' style experiment arguments against typed defaults.

    A bare name sets a bool default to True; `key=value` is converted to the default's type.
    """
    parsed = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or '').split(',')):
        key, has_value, value = item.partition('=')
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is unknown (expected one of {', '.join(defaults)})")
        kind = type(defaults[key])
        if not has_value:
            if kind is not bool:
                raise ValueError(f'config argument {key!r} needs a value ({key}=...)')
            parsed[key] = True
        elif kind is bool:
            parsed[key] = value.lower() in ('1', 'true', 'yes')
        else:
            parsed[key] = kind(value)
    return parsed
