"""LPIPS: `lpips.LPIPS(net='vgg', version='0.1')` of the `lpips` package (eval mode) in Flax, NHWC.

Inputs are flowjax images in [-1, 1], the package's convention (normalize=False). The package's
scaling layer, torchvision's VGG16 `features` tapped after relu1_2 ... relu5_3, unit-normalised
channels, squared differences weighted by the v0.1 linear heads, spatial means summed over taps.
"""

import importlib.util
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from flowjax import errors
from flowjax.metrics import resize, torch_weights

VGG_FILE = 'vgg16-397923af.pth'
VGG_URL = f'https://download.pytorch.org/models/{VGG_FILE}'
SHIFT = (-0.030, -0.088, -0.188)  # the package's ScalingLayer
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # lpips.normalize_tensor
HIGHEST = jax.lax.Precision.HIGHEST
# torchvision's vgg16 config 'D': conv widths, 'M' a 2x2 pool. LPIPS stops at relu5_3 (before the last pool).
CONFIG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
CHANNELS = (64, 128, 256, 512, 512)  # of the taps, one before each pool and at the end


def conv_layers() -> list[tuple[int, int, int]]:
    """(torchvision `features` index, in channels, out channels) of the 13 convolutions."""
    layers, index, cin = [], 0, 3
    for item in CONFIG:
        if item == 'M':
            index += 1
        else:
            layers.append((index, cin, item))
            index, cin = index + 2, item  # conv, ReLU
    return layers


def torch_shapes() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """({name: shape} of the torchvision VGG16 features, {name: shape} of the v0.1 heads)."""
    vgg = {}
    for index, cin, cout in conv_layers():
        vgg[f'features.{index}.weight'], vgg[f'features.{index}.bias'] = (cout, cin, 3, 3), (cout,)
    return vgg, {f'lin{k}.model.1.weight': (1, c, 1, 1) for k, c in enumerate(CHANNELS)}


def random_torch_state_dicts(seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Random float32 (VGG16 features, heads) under the torch names: He-normal convs, small biases,
    non-negative heads up to 1 (the real ones reach 1.3). Drawn in the order of `torch_shapes`."""
    rng = np.random.default_rng(seed)
    vgg_shapes, head_shapes = torch_shapes()
    vgg = {}
    for name, shape in vgg_shapes.items():
        std = np.sqrt(2.0 / np.prod(shape[1:])) if name.endswith('weight') else 0.05
        vgg[name] = rng.normal(0.0, std, shape).astype(np.float32)
    heads = {name: rng.uniform(0.0, 1.0, shape).astype(np.float32) for name, shape in head_shapes.items()}
    return vgg, heads


def params_from_torch(vgg_state_dict: dict[str, np.ndarray], head_state_dict: dict[str, np.ndarray]) -> dict:
    """Flax variables of `LPIPS` from torchvision's VGG16 state dict and the lpips v0.1 head dict."""
    vgg_shapes, head_shapes = torch_shapes()
    torch_weights.check_state_dict(vgg_state_dict, vgg_shapes, 'VGG16 state dict')
    torch_weights.check_state_dict(head_state_dict, head_shapes, 'LPIPS head state dict')
    params: dict[str, Any] = {}
    for index, _, _ in conv_layers():
        kernel = np.asarray(vgg_state_dict[f'features.{index}.weight'], np.float32).transpose(2, 3, 1, 0)  # OIHW->HWIO
        params[f'features_{index}'] = {'kernel': kernel,
                                       'bias': np.asarray(vgg_state_dict[f'features.{index}.bias'], np.float32)}
    for k in range(len(CHANNELS)):
        params[f'lin{k}'] = np.asarray(head_state_dict[f'lin{k}.model.1.weight'], np.float32).reshape(-1)
    return {'params': params}


def _pool(h: jax.Array, kind: str) -> jax.Array:
    """torch's MaxPool2d(2, 2) or AvgPool2d(2, 2) (an odd last row or column is dropped), from four
    strided slices: XLA:CPU miscomputes bfloat16 reduce_window after these convolutions (jax 0.12)."""
    h = h[:, :h.shape[1] // 2 * 2, :h.shape[2] // 2 * 2]
    corners = (h[:, 0::2, 0::2], h[:, 0::2, 1::2], h[:, 1::2, 0::2], h[:, 1::2, 1::2])
    if kind == 'max':
        return jnp.maximum(jnp.maximum(corners[0], corners[1]), jnp.maximum(corners[2], corners[3]))
    return (corners[0] + corners[1] + corners[2] + corners[3]) * 0.25


def _unit_normalize(h: jax.Array) -> jax.Array:
    """h / (|h| + EPS) over channels; a zero vector gets a zero (not NaN) gradient through |h|."""
    sq = jnp.sum(jnp.square(h), axis=-1, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
    return h / (norm + EPS)


class LPIPS(nn.Module):
    """(x, y) of (B, H, W, 1 or 3) images in [-1, 1] -> (B,) float32 LPIPS distances."""
    resize: int | None = None  # both images resized to resize x resize first (bilinear, as torch)
    pool: str = 'max'  # VGG's pooling: 'max' (the package's) or 'avg'
    dtype: Any = jnp.float32  # compute dtype of the convolutions (bfloat16 for a cheaper training loss)
    precision: Any = None  # of the convolutions; None: HIGHEST in float32 (no TF32), else the backend's default

    @property
    def _precision(self):
        return HIGHEST if self.precision is None and jnp.dtype(self.dtype) == jnp.float32 else self.precision

    def preprocess(self, x: jax.Array) -> jax.Array:
        """Gray to RGB, resize, the package's scaling layer; float32."""
        x = jnp.asarray(x, jnp.float32)
        if x.shape[-1] == 1:
            x = jnp.repeat(x, 3, axis=-1)
        if self.resize:
            x = resize.bilinear(x, self.resize, HIGHEST)
        return (x - jnp.array(SHIFT)) / jnp.array(SCALE)

    def taps(self, convs: dict[int, nn.Conv], x: jax.Array) -> list[jax.Array]:
        """VGG16's relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of (B, H, W, 1 or 3) images."""
        h, layers, taps = self.preprocess(x).astype(self.dtype), iter(conv_layers()), []
        for item in CONFIG:
            if item == 'M':
                taps.append(h)
                h = _pool(h, self.pool)
            else:
                h = nn.relu(convs[next(layers)[0]](h))
        return [*taps, h]

    @nn.compact
    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f'LPIPS wants two (B, H, W, 1 or 3) images of one shape, got {x.shape} and {y.shape}')
        if self.pool not in ('max', 'avg'):
            raise ValueError(f"LPIPS pool must be 'max' or 'avg', got {self.pool!r}")
        convs = {index: nn.Conv(cout, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, precision=self._precision,
                                name=f'features_{index}') for index, _, cout in conv_layers()}
        batch, total = x.shape[0], jnp.zeros((x.shape[0],), jnp.float32)
        for k, tap in enumerate(self.taps(convs, jnp.concatenate([x, y]))):  # one VGG pass for both
            head = self.param(f'lin{k}', nn.initializers.zeros_init(), (CHANNELS[k],), jnp.float32)
            # Unfused from the difference, which XLA:CPU may otherwise round unlike for x and y: d(x, x) = 0.
            unit = jax.lax.optimization_barrier(_unit_normalize(tap.astype(jnp.float32)))
            diff = jnp.mean(jnp.square(unit[:batch] - unit[batch:]), axis=(1, 2))  # (B, C): mean, then the 1x1 head
            total = total + jnp.dot(diff, head, precision=HIGHEST)
        return total


def default_head_path(field: str) -> str:
    """The v0.1 `vgg.pth` heads inside an installed `lpips` package (found, not imported: it imports torch)."""
    spec = importlib.util.find_spec('lpips')
    if spec is None or not spec.submodule_search_locations:
        raise errors.UserError(f'{field}: not set and the `lpips` package, which ships the v0.1 heads, is not '
                               f'installed; `pip install lpips` (only its weights file is read; torch is not needed) '
                               f'or set {field} to a v0.1 vgg.pth')
    return str(epath.Path(list(spec.submodule_search_locations)[0]) / 'weights' / 'v0.1' / 'vgg.pth')


def load(vgg_path: str | None, head_path: str | None = None, *, resize: int | None = None, pool: str = 'max',
         field: str = 'distill.lpips') -> tuple[LPIPS, dict]:
    """(module, variables) from torchvision's VGG16 weights and the v0.1 heads (None: the `lpips` package's).

    `field` names the VGG file's config field in errors; the heads' is `<section>.head_weights` when
    `field` is `<section>.vgg_weights`.
    """
    head_field = field[:-len('vgg_weights')] + 'head_weights' if field.endswith('.vgg_weights') else field
    if not vgg_path or not epath.Path(vgg_path).exists():
        raise errors.UserError(f'{field}: LPIPS needs torchvision\'s VGG16 ImageNet weights {VGG_FILE}'
                               f'{f" (not found at {vgg_path})" if vgg_path else ""}; download it from {VGG_URL} '
                               f'and set {field} to its path')
    head_path = head_path or default_head_path(head_field)
    vgg = torch_weights.load_state_dict(str(vgg_path), field)
    heads = torch_weights.load_state_dict(str(head_path), head_field)
    vgg_shapes, head_shapes = torch_shapes()
    torch_weights.check_state_dict(vgg, vgg_shapes, f'{field}: {vgg_path}')
    torch_weights.check_state_dict(heads, head_shapes, f'{head_field}: {head_path}')
    return LPIPS(resize=resize, pool=pool), params_from_torch(vgg, heads)


def check_config(config: Any, image_shape: tuple[int, ...], load: Callable[[Any], Any] | None = None) -> None:
    """Static checks of a config's `lpips` section for images of `image_shape` (H, W, C): the pooling,
    the size VGG16 sees and that the VGG16 weights file exists (one-line errors naming the field).
    A missing file is reported by `load(config)` (default `from_config`), which raises that error."""
    if config.pool not in ('max', 'avg'):
        raise errors.ConfigError(f"lpips.pool={config.pool!r}: expected 'max' or 'avg'")
    if (config.resize or min(image_shape[:2])) < 16:  # VGG16 pools four times before its last tap
        raise errors.ConfigError(f'lpips.resize={config.resize}: LPIPS needs images of at least 16x16; '
                                 'set lpips.resize (e.g. 64)')
    if not config.vgg_weights or not epath.Path(config.vgg_weights).exists():
        (load or from_config)(config)  # raises the one-line error saying which file and where to get it


def from_config(config: Any) -> tuple[LPIPS, dict]:
    """(module, variables) of LPIPS as a config's `lpips` section describes it."""
    return load(config.vgg_weights, config.head_weights, resize=config.resize, pool=config.pool,
                field='lpips.vgg_weights')


def distance_fn(module: LPIPS) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """The pure `distance(variables, x, y) -> (B,)`, for the caller to jit or differentiate."""

    def distance(variables, x, y):
        return module.apply(variables, x, y)

    return distance
