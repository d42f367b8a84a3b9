"""A PyTorch NCSN++ rectified-flow checkpoint (score_sde_pytorch layout) as a flowjax velocity export.

    python -m flowjax.interop.torch_ncsnpp --checkpoint checkpoint_8.pth --out runs/rf_cifar \\
        --config data.image_size=32 [--weights ema|model] [--config model.dropout=0.15 ...]

The rectified-flow reference code (and SlimFlow's, which keeps the same network and checkpoint code) saves
`torch.save({'optimizer', 'model', 'ema', 'step'})`: `model` the state dict of the DataParallel-wrapped
NCSNpp (keys `module.all_modules.<i>.<...>` and the buffer `module.sigmas`), `ema` the state of its
ExponentialMovingAverage (`decay`, `num_updates` and `shadow_params`, one tensor per trainable parameter in
parameter order: the state dict's order less its buffers). The file is read without torch
(`flowjax.interop.torch_pickle`); by default the EMA weights are taken (the ones the reference samples
with), `--weights model` takes the raw ones. The network's layout (nf, ch_mult, num_res_blocks, the levels
with attention, channels, time conditioning) is read from the tensors' shapes; the image size is not in
them and must be given (`--config data.image_size=N`); other fields of the reference's config may be given
as `key=value` (checked against the shapes where they tell, otherwise taken as given). Only the variant
flowjax's NCSNpp implements is converted: DDPM++ with BigGAN residual blocks, no FIR, not progressive,
positional time embedding, centered data, no sigma scaling; anything else is refused in one line.

Time: the reference trains and samples its network as `model(x_t, 999 t)` with `x_t = t x1 + (1 - t) x0`,
t = 0 noise and t = 1 data, and embeds `999 t` sinusoidally: flowjax's convention and its NCSNpp's own time
scaling. So the export's velocity v(x, t) is the reference's network at (x, 999 t) (docs/methods.md,
Importing PyTorch teachers), with NHWC images for the reference's NCHW.
"""

import ast
import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
from etils import epath

from flowjax import checkpoint, errors, interop
from flowjax.flows import objective
from flowjax.interop import torch_pickle
from flowjax import models
from flowjax.models import kinds

FORMAT = 'score_sde_pytorch'  # the checkpoint layout of the rectified-flow (and SlimFlow) PyTorch code
WEIGHTS = ('ema', 'model')
BUFFERS = ('sigmas',)  # the reference NCSNpp's buffers: in the state dict, not among its parameters
DEFAULT_DROPOUT = 0.15  # the reference CIFAR-10 configs' (RF and SlimFlow); only training reads it
T_EPS = 1e-3  # the reference's smallest time (its samplers start there)

# The reference's config fields a user may give (`key=value`): field -> (type, what flowjax can take).
# Shape-given fields are checked against the checkpoint; `supported` lists the only values converted.
_FIELDS: dict[str, tuple[type, tuple | None]] = {
    'data.image_size': (int, None),
    'data.num_channels': (int, None),
    'data.centered': (bool, (True,)),
    'model.name': (str, ('ncsnpp',)),
    'model.nf': (int, None),
    'model.ch_mult': (tuple, None),
    'model.num_res_blocks': (int, None),
    'model.attn_resolutions': (tuple, None),
    'model.conditional': (bool, None),
    'model.dropout': (float, None),
    'model.skip_rescale': (bool, None),
    'model.resamp_with_conv': (bool, None),
    'model.init_scale': (float, None),
    'model.resblock_type': (str, ('biggan',)),
    'model.embedding_type': (str, ('positional',)),
    'model.fir': (bool, (False,)),
    'model.progressive': (str, ('none',)),
    'model.progressive_input': (str, ('none',)),
    'model.scale_by_sigma': (bool, (False,)),
    'model.nonlinearity': (str, ('swish',)),
    'model.normalization': (str, ('GroupNorm',)),
    'model.attention_type': (str, ('ddpm',)),
}
_WHY = {
    'data.centered': "False: the reference's network maps its input x to 2 x - 1 itself, flowjax's NCSNpp does not",
    'model.name': "the converter reads the reference's NCSN++ ('ncsnpp') only",
    'model.resblock_type': "'ddpm' residual blocks (with separate resampling layers) are not converted",
    'model.embedding_type': "'fourier': the reference embeds log(999 t), which flowjax's NCSNpp does not",
    'model.fir': 'FIR resampling is not implemented by flowjax\'s NCSNpp',
    'model.progressive': 'progressive output paths are not implemented by flowjax\'s NCSNpp',
    'model.progressive_input': 'progressive input paths are not implemented by flowjax\'s NCSNpp',
    'model.scale_by_sigma': "the output's division by a noise level (score models) is not implemented",
    'model.nonlinearity': "flowjax's NCSNpp uses swish (SiLU) only",
    'model.normalization': "flowjax's NCSNpp uses GroupNorm only",
    'model.attention_type': "flowjax's NCSNpp has the DDPM attention block only",
}


@dataclasses.dataclass(frozen=True)
class Layout:
    """The reference network's sizes, as its tensors' shapes give them (attention by level: 0 the finest)."""

    nf: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_levels: tuple[int, ...]
    channels: int
    conditional: bool


def _fail_where(field: str, message: str) -> errors.UserError:
    return errors.UserError(f'{field}: {message}')


# --- reading the checkpoint -------------------------------------------------------------------------------------

def read_checkpoint(path: str, field: str = '--checkpoint') -> dict:
    """The reference checkpoint dict at `path` (tensors as numpy), its layout checked; one-line UserErrors."""
    obj = torch_pickle.load(path, field, 'PyTorch checkpoint')
    if not isinstance(obj, dict) or 'model' not in obj:
        got = f'keys {sorted(map(str, obj))[:6]}' if isinstance(obj, dict) else type(obj).__name__
        raise _fail_where(field, f'{path} is not a {FORMAT} checkpoint (expected a dict with model, ema, optimizer '
                                 f"and step, got {got})")
    model = obj['model']
    if not isinstance(model, dict) or not model or not all(isinstance(v, np.ndarray) for v in model.values()):
        raise _fail_where(field, f"{path}: its 'model' is not a state dict of tensors")
    return obj


def strip_prefix(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state dict without DataParallel's `module.` (every key has it, or none is changed)."""
    if all(k.startswith('module.') for k in state_dict):
        return {k[len('module.'):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def weights(ckpt: dict, which: str = 'ema', field: str = '--checkpoint') -> dict[str, np.ndarray]:
    """{reference name: array} of the `which` weights of checkpoint `ckpt`: 'model' its state dict, 'ema' its
    EMA shadow params put on the parameter names in order (the state dict less its buffers), each shape checked."""
    if which not in WEIGHTS:
        raise _fail_where('--weights', f'{which!r}: expected one of {", ".join(WEIGHTS)}')
    state = strip_prefix(ckpt['model'])
    params = {k: v for k, v in state.items() if k not in BUFFERS}
    if which == 'model':
        return params
    ema = ckpt.get('ema')
    shadow = ema.get('shadow_params') if isinstance(ema, dict) else None
    if not isinstance(shadow, (list, tuple)) or not all(isinstance(v, np.ndarray) for v in shadow):
        raise _fail_where(field, "the checkpoint has no EMA weights ('ema' with a list 'shadow_params'); "
                                 'use --weights model for the raw ones')
    names = list(params)
    if len(shadow) != len(names):
        raise _fail_where(field, f"ema.shadow_params holds {len(shadow)} tensors, but 'model' has {len(names)} "
                                 'parameters (its tensors less the buffers sigmas)')
    for i, (name, value) in enumerate(zip(names, shadow)):
        if value.shape != params[name].shape:
            raise _fail_where(field, f'ema.shadow_params[{i}] (parameter {name!r}) has shape {list(value.shape)}, '
                                     f"expected {list(params[name].shape)} as in 'model'")
    return dict(zip(names, shadow))


# --- the network's layout from its shapes ----------------------------------------------------------------------

def _modules(params: dict[str, np.ndarray], field: str) -> list[dict[str, np.ndarray]]:
    """The tensors of each reference module all_modules.<i>, in order (a key of another form is refused)."""
    modules: dict[int, dict[str, np.ndarray]] = {}
    for key, value in params.items():
        head, _, rest = key.partition('.')
        index, _, name = rest.partition('.')
        if head != 'all_modules' or not index.isdigit() or not name:
            raise _fail_where(field, f'unexpected key {key!r} (an NCSN++ state dict has all_modules.<i>.<name> '
                                     f'and {", ".join(BUFFERS)})')
        modules.setdefault(int(index), {})[name] = value
    if sorted(modules) != list(range(len(modules))):
        missing = min(set(range(max(modules) + 1)) - set(modules))
        raise _fail_where(field, f'no tensors of module all_modules.{missing}')
    return [modules[i] for i in range(len(modules))]


def _token(module: dict[str, np.ndarray]) -> str:
    """What a module is: L (linear), C (conv), N (group norm), R (BigGAN residual block), A (attention),
    F (Fourier features), D (a DDPM-style residual block) or ? (another)."""
    names = set(module)
    if names == {'W'}:
        return 'F'
    if names == {'weight', 'bias'}:
        return {2: 'L', 4: 'C', 1: 'N'}.get(module['weight'].ndim, '?')
    if {'GroupNorm_0.weight', 'NIN_0.W', 'NIN_3.W'} <= names:
        return 'A'
    if {'GroupNorm_0.weight', 'Conv_0.weight', 'GroupNorm_1.weight', 'Conv_1.weight'} <= names:
        return 'D' if 'NIN_0.W' in names or ('Conv_2.weight' in names and module['Conv_2.weight'].shape[-1] == 3) \
            else 'R'
    return '?'


def _channels(module: dict[str, np.ndarray]) -> tuple[int, int]:
    """(in, out) channels of a residual block."""
    w = module['Conv_0.weight']
    return int(w.shape[1]), int(w.shape[0])


def infer_layout(params: dict[str, np.ndarray], field: str = '--checkpoint') -> Layout:
    """The network's sizes from the shapes of its tensors (a layout flowjax does not build is one line)."""
    mods = _modules(params, field)
    tokens = [_token(m) for m in mods]
    if 'F' in tokens:
        raise _fail_where(field, f"model.embedding_type='fourier' (all_modules.{tokens.index('F')}.W): "
                                 + _WHY['model.embedding_type'])
    if 'D' in tokens:
        raise _fail_where(field, f"model.resblock_type='ddpm' (all_modules.{tokens.index('D')}): "
                                 + _WHY['model.resblock_type'])
    for i, (m, token) in enumerate(zip(mods, tokens)):  # a block that lost a tensor: name the tensor
        for kind in ('R', 'A') if token == '?' else ():
            missing = [k for k in _REQUIRED[kind] if k not in m]
            if len(missing) < len(_REQUIRED[kind]) // 2:
                raise _fail_where(field, f'missing key all_modules.{i}.{missing[0]} (of {_NAMES[kind]})')
    conditional = tokens[:2] == ['L', 'L']
    start = 2 if conditional else 0
    if len(tokens) <= start or tokens[start] != 'C':
        raise _fail_where(field, f'all_modules.{start} is not the input convolution of an NCSN++ network')
    nf, channels = int(mods[start]['weight'].shape[0]), int(mods[start]['weight'].shape[1])
    blocks = [i for i, t in enumerate(tokens) if t == 'R']
    resample = [i for i in blocks if 'Conv_2.weight' in mods[i] and _channels(mods[i])[0] == _channels(mods[i])[1]]
    levels = len(resample) // 2 + 1
    per_level = len(blocks) / levels
    n = (per_level - 3) / 2
    if len(resample) % 2 or n != int(n) or n < 1:
        raise _fail_where(field, f'its {len(blocks)} residual blocks ({len(resample)} resampling) do not make an '
                                 'NCSN++ U-Net (progressive or other variants are not converted)')
    n = int(n)
    mults, attn, pos = [], [], start + 1

    def expect(kind: str, what: str) -> int:
        nonlocal pos
        if pos < len(tokens) and tokens[pos] != kind and set(_REQUIRED[kind]) & set(mods[pos]):
            missing = [k for k in _REQUIRED[kind] if k not in mods[pos]]
            if missing:
                raise _fail_where(field, f'missing key all_modules.{pos}.{missing[0]} ({what})')
        if pos >= len(tokens) or tokens[pos] != kind:
            got = tokens[pos] if pos < len(tokens) else 'nothing'
            raise _fail_where(field, f'all_modules.{pos} is {_NAMES.get(got, got)}, but the NCSN++ layout has '
                                     f'{what} there (only DDPM++ with BigGAN blocks, not progressive, is converted)')
        pos += 1
        return pos - 1

    for level in range(levels):
        for b in range(n):
            i = expect('R', f'a residual block of level {level}')
            out = _channels(mods[i])[1]
            if b == 0:
                if out % nf:
                    raise _fail_where(field, f'all_modules.{i} has {out} channels, not a multiple of nf={nf}')
                mults.append(out // nf)
            if pos < len(tokens) and tokens[pos] == 'A':
                if b == 0:
                    attn.append(level)
                elif level not in attn:
                    raise _fail_where(field, f'all_modules.{pos}: attention after some blocks of level {level} only')
                pos += 1
            elif level in attn:
                raise _fail_where(field, f'all_modules.{pos}: attention after some blocks of level {level} only')
        if level != levels - 1:
            expect('R', f'the downsampling block of level {level}')
    for what in ('R', 'A', 'R'):
        expect(what, f'the middle {_NAMES[what]}')
    for level in reversed(range(levels)):
        for _ in range(n + 1):
            expect('R', f'an upsampling-path residual block of level {level}')
        if level in attn:
            expect('A', f'the attention of level {level}')
        if level != 0:
            expect('R', f'the upsampling block of level {level}')
    expect('N', 'the output group norm')
    expect('C', 'the output convolution')
    if pos != len(tokens):
        raise _fail_where(field, f'all_modules.{pos}: more modules than the NCSN++ layout has ({len(tokens)} for '
                                 f'{pos})')
    return Layout(nf, tuple(mults), n, tuple(attn), channels, conditional)


# the tensors each kind of module has (a residual block's Dense_0 and Conv_2 are checked with the parameters)
_REQUIRED = {
    'R': tuple(f'{m}.{p}' for m in ('GroupNorm_0', 'Conv_0', 'GroupNorm_1', 'Conv_1') for p in ('weight', 'bias')),
    'A': ('GroupNorm_0.weight', 'GroupNorm_0.bias', *(f'NIN_{i}.{p}' for i in range(4) for p in ('W', 'b'))),
    'C': ('weight', 'bias'), 'N': ('weight', 'bias'), 'L': ('weight', 'bias'),
}
_NAMES = {'L': 'a linear layer', 'C': 'a convolution', 'N': 'a group norm', 'R': 'residual block',
          'A': 'attention block', '?': 'a module of another kind'}


# --- the reference's config fields -------------------------------------------------------------------------------

def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """{field: value} of `key=value` items (the reference's config fields, e.g. data.image_size=32)."""
    parsed = {}
    for item in items:
        key, sep, text = item.partition('=')
        key = key.strip().removeprefix('config.')
        if not sep or key not in _FIELDS:
            raise errors.UserError(f'--config {item!r}: expected key=value with key one of {", ".join(_FIELDS)}')
        kind = _FIELDS[key][0]
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        if kind is bool and isinstance(value, str) and value.lower() in ('true', 'false'):
            value = value.lower() == 'true'
        if kind is tuple and isinstance(value, (int, list)):
            value = (value,) if isinstance(value, int) else tuple(value)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is tuple:
            ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        if not ok:
            raise errors.UserError(f'--config {key}={text}: expected {"a tuple of ints" if kind is tuple else kind.__name__}')
        parsed[key] = value
    return parsed


def model_config(layout: Layout, overrides: dict[str, Any], field: str = '--config') -> tuple[dict, list[int]]:
    """(flowjax's NCSNpp config, the sample shape HWC) of the reference network of `layout` and the config
    fields `overrides`; a field flowjax's network does not implement, or one the shapes contradict, is one line."""
    for key, value in overrides.items():
        supported = _FIELDS[key][1]
        if supported is not None and value not in supported:
            raise errors.UserError(f'{field} {key}={value!r}: not supported ({_WHY[key]})')
    size = overrides.get('data.image_size')
    if size is None:
        raise errors.UserError(f'{field}: give data.image_size=N (the image size; the checkpoint\'s shapes do not '
                               'tell it)')
    levels = len(layout.ch_mult)
    if size < 1 or size % 2 ** (levels - 1):
        raise errors.UserError(f'{field} data.image_size={size}: must be a multiple of {2 ** (levels - 1)} '
                               f'(the network halves it {levels - 1} times)')
    attn = tuple(size // 2 ** level for level in layout.attn_levels)
    inferred = {'data.num_channels': layout.channels, 'model.nf': layout.nf, 'model.ch_mult': layout.ch_mult,
                'model.num_res_blocks': layout.num_res_blocks, 'model.conditional': layout.conditional,
                'model.embedding_type': 'positional', 'model.resblock_type': 'biggan'}
    for key, value in inferred.items():
        if key in overrides and overrides[key] != value:
            raise errors.UserError(f'{field} {key}={overrides[key]!r}: the checkpoint\'s network has {value!r}')
    if 'model.attn_resolutions' in overrides:
        resolutions = {size // 2 ** level for level in range(levels)}
        given = tuple(sorted({r for r in overrides['model.attn_resolutions'] if r in resolutions}, reverse=True))
        if given != attn:
            raise errors.UserError(f"{field} model.attn_resolutions={overrides['model.attn_resolutions']!r}: the "
                                   f'checkpoint\'s network has attention at {attn or "no resolution"} '
                                   f'(images of {size})')
    config = {'name': 'ncsnpp', 'nf': layout.nf, 'ch_mult': list(layout.ch_mult),
              'num_res_blocks': layout.num_res_blocks, 'attn_resolutions': list(attn),
              'dropout': float(overrides.get('model.dropout', DEFAULT_DROPOUT))}
    defaults = models.defaults('ncsnpp')
    for name, key in (('conditional', 'model.conditional'), ('skip_rescale', 'model.skip_rescale'),
                      ('resamp_with_conv', 'model.resamp_with_conv'), ('init_scale', 'model.init_scale')):
        value = layout.conditional if name == 'conditional' else overrides.get(key, defaults[name])
        if value != defaults[name]:  # the fields a recipe sets: the rest are the network's defaults
            config[name] = value
    return config, [size, size, layout.channels]


# --- the flowjax parameters ---------------------------------------------------------------------------------------

# How each flowjax parameter is made from a reference tensor: (the reference tensor's name in its module,
# the axes of it that become the flowjax axes: linear weights (out, in) -> kernels (in, out), conv weights
# (out, in, kh, kw) -> (kh, kw, in, out); GroupNorm weight -> scale, NIN W (in, out) -> a Dense kernel as it is).
_LINEAR = {'kernel': ('weight', (1, 0)), 'bias': ('bias', (0,))}
_CONV = {'kernel': ('weight', (2, 3, 1, 0)), 'bias': ('bias', (0,))}
_NORM = {'scale': ('weight', (0,)), 'bias': ('bias', (0,))}


def _nin(i: int) -> dict:
    return {'kernel': (f'NIN_{i}.W', (0, 1)), 'bias': (f'NIN_{i}.b', (0,))}


def _sub(prefix: str, table: dict) -> dict:
    return {leaf: (f'{prefix}.{name}', axes) for leaf, (name, axes) in table.items()}


def _resblock(m: dict, conditional: bool) -> dict:
    out = {'GroupNorm_0': _sub('GroupNorm_0', _NORM), 'Conv_0': _sub('Conv_0', _CONV),
           'GroupNorm_1': _sub('GroupNorm_1', _NORM), 'Conv_1': _sub('Conv_1', _CONV)}
    if conditional:  # an unconditional reference block keeps its (unused) time projection: dropped
        out['Dense_0'] = _sub('Dense_0', _LINEAR)
    if 'Conv_2.weight' in m or 'Conv_2.bias' in m:
        out['skip'] = _sub('Conv_2', _CONV)
    return out


_ATTN = {'GroupNorm_0': _sub('GroupNorm_0', _NORM), 'q': _nin(0), 'k': _nin(1), 'v': _nin(2), 'out': _nin(3)}


def sources(params: dict[str, np.ndarray], layout: Layout, field: str = '--checkpoint') -> dict[str, tuple[str, tuple]]:
    """{flowjax parameter ('params.ResnetBlock_0.Conv_0.kernel'): (reference key, axes)} of the network: its
    modules in order, residual blocks as ResnetBlock_<k>, attention blocks as AttnBlock_<k> (docs/methods.md,
    Importing PyTorch teachers)."""
    mods = _modules(params, field)
    tree: dict[str, dict] = {}
    blocks = attns = 0
    for i, m in enumerate(mods):
        token = _token(m)
        if layout.conditional and i < 2:
            name, table = f'temb_{i}', _LINEAR
        elif token == 'C':
            name, table = 'conv_in' if 'conv_in' not in tree else 'conv_out', _CONV
        elif token == 'N':
            name, table = 'norm_out', _NORM
        elif token == 'R':
            name, table, blocks = f'ResnetBlock_{blocks}', _resblock(m, layout.conditional), blocks + 1
        else:
            name, table, attns = f'AttnBlock_{attns}', _ATTN, attns + 1
        tree[name] = {'module': i, 'table': table}
    flat = {}
    for name, entry in tree.items():
        def visit(node, path):
            for key, value in node.items():
                if isinstance(value, dict):
                    visit(value, (*path, key))
                else:
                    flat['.'.join(('params', name, *path, key))] = (f"all_modules.{entry['module']}.{value[0]}", value[1])
        visit(entry['table'], ())
    return flat


def flax_params(params: dict[str, np.ndarray], layout: Layout, kind: kinds.Kind, sample_shape: list[int],
                field: str = '--checkpoint') -> dict:
    """flowjax NCSNpp variables {'params': ...} (float32) of the reference tensors `params`, every name and
    shape checked against the network of `kind`: the first reference key missing, of a wrong shape or left
    over is one line (with the shape expected in the reference's layout)."""
    expected = jax.eval_shape(lambda key: kind.init(key, tuple(sample_shape)), jax.random.key(0))
    want = {jax.tree_util.keystr(p, simple=True, separator='.'): tuple(a.shape)
            for p, a in jax.tree_util.tree_leaves_with_path(expected)}
    made = sources(params, layout, field)
    used = set()
    tree: dict[str, Any] = {}
    for name, shape in want.items():
        if name not in made:
            raise _fail_where(field, f'the checkpoint has no tensor for flowjax parameter {name}')
        key, axes = made[name]
        ref_shape = [0] * len(shape)
        for j, axis in enumerate(axes):
            ref_shape[axis] = shape[j]
        if key not in params:
            raise _fail_where(field, f'missing key {key} (expected shape {ref_shape})')
        if list(params[key].shape) != ref_shape:
            raise _fail_where(field, f'{key} has shape {list(params[key].shape)}, expected {ref_shape}')
        used.add(key)
        node = tree
        *parents, leaf = name.split('.')
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = np.ascontiguousarray(np.transpose(params[key], axes), np.float32)
    dropped = {key for name, (key, _) in made.items() if name not in want}
    extra = sorted(set(params) - used - dropped - {k for k in params if _unused(k, layout)},
                   key=lambda k: (int(k.split('.')[1]), k))
    if extra:
        raise _fail_where(field, f'unexpected key {extra[0]} (not a tensor of the NCSN++ network)')
    return tree


def _unused(key: str, layout: Layout) -> bool:
    """A reference tensor flowjax's network has no counterpart of: an unconditional block's time projection."""
    return not layout.conditional and '.Dense_0.' in key


# --- the export -------------------------------------------------------------------------------------------------

def convert(path: str, which: str = 'ema', overrides: dict[str, Any] | None = None) -> tuple[dict, dict]:
    """(variables, export meta) of the reference checkpoint at `path`, its `which` weights ('ema' or 'model')
    and the reference config fields `overrides` ({'data.image_size': 32, ...})."""
    overrides = dict(overrides or {})
    ckpt = read_checkpoint(path)
    layout = infer_layout(weights(ckpt, 'model'))  # a variant flowjax does not build is refused first
    params = weights(ckpt, which)
    model, shape = model_config(layout, overrides)
    kind = kinds.VelocityField.from_model_config(model)
    try:
        kind.module  # noqa: B018 - the config flowjax's NCSNpp takes
    except errors.UserError as e:
        raise errors.UserError(f'--config: {e}') from None
    variables = flax_params(params, layout, kind, shape)
    ema = ckpt.get('ema') if isinstance(ckpt.get('ema'), dict) else {}
    step = ckpt.get('step')
    source = {'format': FORMAT, 'file': os.path.basename(str(path)),
              'sha256': _sha256(path), 'weights': which,
              'step': step if isinstance(step, int) else None,
              'ema_decay': ema.get('decay') if which == 'ema' else None,
              'ema_num_updates': ema.get('num_updates') if which == 'ema' else None,
              'time': 'v(x, t) = network(x, 999 t); t = 0 noise, t = 1 data', 'config': {
                  k: list(v) if isinstance(v, tuple) else v for k, v in sorted(overrides.items())}}
    flow = objective.defaults()
    flow.t_eps = T_EPS
    meta = {'method': 'import', **kind.meta(), 'sample_shape': shape, 'step': step if isinstance(step, int) else 0,
            'flow': json.loads(flow.to_json()), 'source': source}
    return variables, meta


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with epath.Path(path).open('rb') as f:
        for chunk in iter(lambda: f.read(1 << 24), b''):
            digest.update(chunk)
    return digest.hexdigest()


def write(path: str, out: str, which: str = 'ema', overrides: dict[str, Any] | None = None) -> epath.Path:
    """Converts the checkpoint at `path` and writes it as the export `out`/export (or `out` itself when it is
    named 'export'), which every flowjax stage reads; an existing export there is refused. Returns its directory."""
    target = epath.Path(os.path.abspath(out) if '://' not in str(out) else out)
    workdir = target.parent if target.name == 'export' else target
    existing = checkpoint.export_dir(workdir)
    if existing.exists():
        raise errors.UserError(f'--out: {existing} exists; convert into another directory or remove it')
    variables, meta = convert(path, which, overrides)
    return checkpoint.export(workdir, variables, meta)


_Parser = interop.parser_class('python -m flowjax.interop.torch_ncsnpp --checkpoint X.pth --out DIR '
                                 '--config data.image_size=N [--weights ema|model] [--config key=value ...]')


def main(argv: list[str] | None = None) -> None:
    """The command line; bad input is one line on stderr and exit status 2."""
    parser = _Parser(prog='python -m flowjax.interop.torch_ncsnpp', description=__doc__.split('\n')[0])
    parser.add_argument('--checkpoint', required=True, help='the .pth file torch.save wrote')
    parser.add_argument('--out', required=True, help='the workdir (or export/ directory) to write')
    parser.add_argument('--weights', default='ema', choices=WEIGHTS, help='the EMA weights (default) or the raw ones')
    parser.add_argument('--config', action='append', default=[], metavar='KEY=VALUE',
                        help="a field of the reference's config, e.g. data.image_size=32 (repeatable)")
    args = parser.parse_args(argv)
    try:
        written = write(args.checkpoint, args.out, args.weights, parse_overrides(args.config))
    except errors.UserError as e:
        interop.fail(str(e))
    print(f'flowjax: wrote {written}')


if __name__ == '__main__':
    main()
