"""The FID Inception-v3: pytorch-fid's `InceptionV3([3])` (2015-12-05 TF graph) in Flax, NHWC.

Inputs are flowjax images in [-1, 1]. pytorch-fid takes [0, 1], resizes to 299x299 (bilinear,
`align_corners=False`, no antialiasing) and maps to [-1, 1]; resizing is linear with weights
summing to one, so resizing our [-1, 1] images directly is the same composition. BatchNorm
(eps 1e-3) is folded into each convolution when the torch weights are converted.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from flowjax import errors
from flowjax.metrics import resize, torch_weights

SIZE = 299
BN_EPS = 1e-3
WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
WEIGHTS_URL = f'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}'
NUM_CLASSES = 1008  # the unused classifier `fc` is part of the state dict


class Conv(NamedTuple):
    """A torch BasicConv2d: conv (no bias) + BatchNorm + ReLU."""
    cin: int
    cout: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)


def _c(cin, cout, kernel, stride=1, padding=0) -> Conv:
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    return Conv(cin, cout, pair(kernel), stride, pair(padding))


STEM = {'Conv2d_1a_3x3': _c(3, 32, 3, 2), 'Conv2d_2a_3x3': _c(32, 32, 3), 'Conv2d_2b_3x3': _c(32, 64, 3, padding=1),
        'Conv2d_3b_1x1': _c(64, 80, 1), 'Conv2d_4a_3x3': _c(80, 192, 3)}
# (name, kind, input channels, pool features / 7x7 channels). E1 avg-pools, E2 max-pools its pool branch.
MIXED = (('Mixed_5b', 'A', 192, 32), ('Mixed_5c', 'A', 256, 64), ('Mixed_5d', 'A', 288, 64),
         ('Mixed_6a', 'B', 288, 0), ('Mixed_6b', 'C', 768, 128), ('Mixed_6c', 'C', 768, 160),
         ('Mixed_6d', 'C', 768, 160), ('Mixed_6e', 'C', 768, 192), ('Mixed_7a', 'D', 768, 0),
         ('Mixed_7b', 'E1', 1280, 0), ('Mixed_7c', 'E2', 2048, 0))


def block_convs(kind: str, cin: int, arg: int) -> dict[str, Conv]:
    """The convolutions of one Mixed block, by torch name."""
    if kind == 'A':
        return {'branch1x1': _c(cin, 64, 1), 'branch5x5_1': _c(cin, 48, 1), 'branch5x5_2': _c(48, 64, 5, padding=2),
                'branch3x3dbl_1': _c(cin, 64, 1), 'branch3x3dbl_2': _c(64, 96, 3, padding=1),
                'branch3x3dbl_3': _c(96, 96, 3, padding=1), 'branch_pool': _c(cin, arg, 1)}
    if kind == 'B':
        return {'branch3x3': _c(cin, 384, 3, 2), 'branch3x3dbl_1': _c(cin, 64, 1),
                'branch3x3dbl_2': _c(64, 96, 3, padding=1), 'branch3x3dbl_3': _c(96, 96, 3, 2)}
    if kind == 'C':
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        return {'branch1x1': _c(cin, 192, 1), 'branch7x7_1': _c(cin, arg, 1), 'branch7x7_2': _c(arg, arg, **row),
                'branch7x7_3': _c(arg, 192, **col), 'branch7x7dbl_1': _c(cin, arg, 1),
                'branch7x7dbl_2': _c(arg, arg, **col), 'branch7x7dbl_3': _c(arg, arg, **row),
                'branch7x7dbl_4': _c(arg, arg, **col), 'branch7x7dbl_5': _c(arg, 192, **row),
                'branch_pool': _c(cin, 192, 1)}
    if kind == 'D':
        return {'branch3x3_1': _c(cin, 192, 1), 'branch3x3_2': _c(192, 320, 3, 2), 'branch7x7x3_1': _c(cin, 192, 1),
                'branch7x7x3_2': _c(192, 192, (1, 7), padding=(0, 3)),
                'branch7x7x3_3': _c(192, 192, (7, 1), padding=(3, 0)), 'branch7x7x3_4': _c(192, 192, 3, 2)}
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    return {'branch1x1': _c(cin, 320, 1), 'branch3x3_1': _c(cin, 384, 1), 'branch3x3_2a': _c(384, 384, **row),
            'branch3x3_2b': _c(384, 384, **col), 'branch3x3dbl_1': _c(cin, 448, 1),
            'branch3x3dbl_2': _c(448, 384, 3, padding=1), 'branch3x3dbl_3a': _c(384, 384, **row),
            'branch3x3dbl_3b': _c(384, 384, **col), 'branch_pool': _c(cin, 192, 1)}


def all_convs() -> dict[tuple[str, ...], Conv]:
    """Every convolution, keyed by its module path (the torch name split at dots)."""
    convs = {(name,): conv for name, conv in STEM.items()}
    for block, kind, cin, arg in MIXED:
        convs.update({(block, name): conv for name, conv in block_convs(kind, cin, arg).items()})
    return convs


def torch_shapes() -> dict[str, tuple[int, ...]]:
    """{name: shape} of pytorch-fid's FID Inception state dict (BatchNorm step counters aside)."""
    shapes = {}
    for path, conv in all_convs().items():
        prefix = '.'.join(path)
        shapes[f'{prefix}.conv.weight'] = (conv.cout, conv.cin, *conv.kernel)
        for stat in ('weight', 'bias', 'running_mean', 'running_var'):
            shapes[f'{prefix}.bn.{stat}'] = (conv.cout,)
    shapes['fc.weight'], shapes['fc.bias'] = (NUM_CLASSES, 2048), (NUM_CLASSES,)
    return shapes


def random_torch_state_dict(seed: int) -> dict[str, np.ndarray]:
    """Random float32 weights under the pytorch-fid names, drawn in sorted-name order; activations stay O(1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(torch_shapes().items()):
        if name.endswith('conv.weight'):  # variance 1.6 / fan_in: pooled features come out O(1)
            value = rng.normal(0.0, np.sqrt(1.6 / np.prod(shape[1:])), shape)
        elif name.endswith(('bn.weight', 'bn.running_var')):
            value = rng.uniform(0.5, 1.5, shape)
        elif name == 'fc.weight':
            value = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
        else:  # BatchNorm bias and running mean, classifier bias
            value = rng.normal(0.0, 0.1, shape)
        out[name] = value.astype(np.float32)
    return out


def params_from_torch(state_dict: dict[str, np.ndarray]) -> dict:
    """Flax variables from a pytorch-fid state dict, BatchNorm folded into each convolution."""
    shapes = torch_shapes()
    counters = {f'{".".join(path)}.bn.num_batches_tracked' for path in all_convs()}
    for name in sorted(state_dict):
        if name not in shapes and name not in counters:
            raise errors.UserError(f'Inception state dict: unexpected key {name!r}')
    torch_weights.check_state_dict(state_dict, shapes, 'Inception state dict')
    params: dict[str, Any] = {}
    for path in all_convs():
        get = lambda suffix: np.asarray(state_dict[f'{".".join(path)}.{suffix}'], np.float64)
        scale = get('bn.weight') / np.sqrt(get('bn.running_var') + BN_EPS)
        kernel = (get('conv.weight') * scale[:, None, None, None]).transpose(2, 3, 1, 0)  # OIHW -> HWIO
        bias = get('bn.bias') - get('bn.running_mean') * scale
        node = params
        for part in path:
            node = node.setdefault(part, {})
        node.update(kernel=kernel.astype(np.float32), bias=bias.astype(np.float32))
    return {'params': params}


def preprocess(images: jax.Array, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """(B, H, W, 1 or 3) images -> (B, 299, 299, 3) float32, gray repeated to RGB."""
    x = jnp.asarray(images, jnp.float32)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f'FID Inception wants (B, H, W, 1 or 3) images, got shape {x.shape}')
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return resize.bilinear(x, SIZE, precision)


def _conv_relu(conv: Conv, name: str, x: jax.Array, precision) -> jax.Array:
    pad = [(p, p) for p in conv.padding]
    return nn.relu(nn.Conv(conv.cout, conv.kernel, conv.stride, pad, precision=precision, name=name)(x))


def _avg_pool(x):  # TF's average pool: padded zeros are not counted
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2):
    return nn.max_pool(x, (3, 3), (stride, stride), 'VALID' if stride == 2 else ((1, 1), (1, 1)))


class Mixed(nn.Module):
    """One Inception block; `kind` is A, B, C, D, E1 or E2 as in `MIXED`."""
    kind: str
    cin: int
    arg: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        convs = block_convs(self.kind, self.cin, self.arg)

        def chain(*names, h=x):
            for name in names:
                h = _conv_relu(convs[name], name, h, self.precision)
            return h

        if self.kind == 'A':
            branches = [chain('branch1x1'), chain('branch5x5_1', 'branch5x5_2'),
                        chain('branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3'),
                        chain('branch_pool', h=_avg_pool(x))]
        elif self.kind == 'B':
            branches = [chain('branch3x3'), chain('branch3x3dbl_1', 'branch3x3dbl_2', 'branch3x3dbl_3'), _max_pool(x)]
        elif self.kind == 'C':
            branches = [chain('branch1x1'), chain(*(f'branch7x7_{i}' for i in range(1, 4))),
                        chain(*(f'branch7x7dbl_{i}' for i in range(1, 6))), chain('branch_pool', h=_avg_pool(x))]
        elif self.kind == 'D':
            branches = [chain('branch3x3_1', 'branch3x3_2'), chain(*(f'branch7x7x3_{i}' for i in range(1, 5))),
                        _max_pool(x)]
        else:
            mid, dbl = chain('branch3x3_1'), chain('branch3x3dbl_1', 'branch3x3dbl_2')
            pooled = _avg_pool(x) if self.kind == 'E1' else _max_pool(x, stride=1)
            branches = [chain('branch1x1'), chain('branch3x3_2a', h=mid), chain('branch3x3_2b', h=mid),
                        chain('branch3x3dbl_3a', h=dbl), chain('branch3x3dbl_3b', h=dbl),
                        chain('branch_pool', h=pooled)]
        return jnp.concatenate(branches, axis=-1)


class FIDInception(nn.Module):
    """(B, H, W, 1 or 3) images in [-1, 1] -> (B, 2048) pool features of the FID Inception-v3."""
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = preprocess(images, self.precision)
        for name in ('Conv2d_1a_3x3', 'Conv2d_2a_3x3', 'Conv2d_2b_3x3'):
            x = _conv_relu(STEM[name], name, x, self.precision)
        x = _max_pool(x)
        for name in ('Conv2d_3b_1x1', 'Conv2d_4a_3x3'):
            x = _conv_relu(STEM[name], name, x, self.precision)
        x = _max_pool(x)
        for name, kind, cin, arg in MIXED:
            x = Mixed(kind, cin, arg, self.precision, name=name)(x)
        return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)


def load(path: str | None, field: str = 'eval.inception_weights') -> tuple[FIDInception, dict]:
    """(module, variables) from pytorch-fid's weights file; `field` names the config field in errors."""
    if not path or not epath.Path(path).exists():
        raise errors.UserError(f'{field}: FID needs the Inception weights file {WEIGHTS_FILE}'
                               f'{f" (not found at {path})" if path else ""}; download it from {WEIGHTS_URL} '
                               f'and set {field} to its path')
    state_dict = torch_weights.load_state_dict(str(path), field)
    try:
        variables = params_from_torch(state_dict)
    except errors.UserError as e:
        raise errors.UserError(f'{field}: {path}: {e}') from None
    return FIDInception(), variables


def feature_fn(module: FIDInception) -> Callable[[Any, jax.Array], jax.Array]:
    """The pure `features(variables, images) -> (B, 2048)`, for the caller to jit or shard."""

    def features(variables, images):
        return module.apply(variables, images)

    return features
