"""NCSN++ / DDPM++ U-Net velocity network (the rectified-flow CIFAR-10 architecture).

Follows the layout of NCSN++ (Song et al. 2021) in its DDPM++ configuration: BigGAN-style
residual blocks that resample inside themselves, skip rescaling by 1/sqrt(2), single-head
self-attention at chosen resolutions and a two-layer time-embedding MLP. Only the non-FIR,
non-progressive variant is implemented. Layout is NHWC.
"""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _init(scale: float = 1.0) -> nn.initializers.Initializer:
    """Fan-average uniform variance scaling; scale 0 becomes 1e-10 (near-zero init)."""
    return nn.initializers.variance_scaling(scale if scale > 0 else 1e-10, 'fan_avg', 'uniform')


def _groups(channels: int) -> int:
    return min(channels // 4, 32)


def positional_embedding(timesteps: jax.Array, dim: int, max_positions: int = 10000) -> jax.Array:
    """Sinusoidal embedding (B,) -> (B, dim), frequencies spaced as in DDPM (half_dim - 1)."""
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(max_positions) / (half - 1)))
    args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a scalar; the frequencies are a frozen parameter."""

    embedding_size: int = 256
    scale: float = 16.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.param('W', nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
        w = jax.lax.stop_gradient(w)
        proj = x.astype(jnp.float32)[:, None] * w[None, :] * 2 * jnp.pi
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


def _conv(features: int, kernel: int, dtype: Any, *, stride: int = 1, init_scale: float = 1.0,
          name: str | None = None) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding='SAME', dtype=dtype,
                   kernel_init=_init(init_scale), bias_init=nn.initializers.zeros, name=name)


def _dense(features: int, dtype: Any, *, init_scale: float = 1.0, name: str | None = None) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, kernel_init=_init(init_scale), bias_init=nn.initializers.zeros,
                    name=name)


def _norm(channels: int, dtype: Any, name: str | None = None) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=_groups(channels), epsilon=1e-6, dtype=dtype, name=name)


def _upsample(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def _downsample(x: jax.Array) -> jax.Array:
    """2x2 average pooling."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with 1x1 (NIN) projections."""

    skip_rescale: bool = True
    init_scale: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        h = _norm(c, self.dtype)(x)
        q = _dense(c, self.dtype, name='q')(h).reshape(b, hh * ww, c)
        k = _dense(c, self.dtype, name='k')(h).reshape(b, hh * ww, c)
        v = _dense(c, self.dtype, name='v')(h).reshape(b, hh * ww, c)
        logits = jnp.einsum('bic,bjc->bij', q, k).astype(jnp.float32) * (c ** -0.5)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        h = jnp.einsum('bij,bjc->bic', weights, v).reshape(b, hh, ww, c)
        h = _dense(c, self.dtype, init_scale=self.init_scale, name='out')(h)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class ResnetBlock(nn.Module):
    """Residual block with time conditioning and skip rescale.

    BigGAN style (`up` / `down`) resamples inside the block, on both branches; without them it
    is the DDPM block. The skip is a 1x1 projection when the channels change or it resamples.
    """

    out_ch: int | None = None
    up: bool = False
    down: bool = False
    dropout: float = 0.1
    skip_rescale: bool = True
    init_scale: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None, train: bool) -> jax.Array:
        c = x.shape[-1]
        out_ch = self.out_ch or c
        h = nn.silu(_norm(c, self.dtype)(x))
        if self.up:
            h, x = _upsample(h), _upsample(x)
        elif self.down:
            h, x = _downsample(h), _downsample(x)
        h = _conv(out_ch, 3, self.dtype)(h)
        if temb is not None:
            h = h + _dense(out_ch, self.dtype)(nn.silu(temb))[:, None, None, :]
        h = nn.silu(_norm(out_ch, self.dtype)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(out_ch, 3, self.dtype, init_scale=self.init_scale)(h)
        if c != out_ch or self.up or self.down:
            x = _conv(out_ch, 1, self.dtype, name='skip')(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class NCSNpp(nn.Module):
    """v(x, t[, y]): x (B, H, W, C) NHWC, t (B,) in [0, 1] (0 noise, 1 data) -> float32 (B, H, W, C)."""

    nf: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    fir: bool = False
    skip_rescale: bool = True
    resblock_type: str = 'biggan'
    progressive: str = 'none'
    progressive_input: str = 'none'
    embedding_type: str = 'positional'
    fourier_scale: float = 16.0
    conditional: bool = True
    num_classes: int = 0
    # > 0: classifier-free guidance. Class id num_classes is the null label (one more embedding row), and in
    # training (train=True) each label is replaced by it with this probability (docs/methods.md, Guidance).
    label_dropout: float = 0.0
    init_scale: float = 0.0
    dtype: str = 'float32'
    out_channels: int | None = None  # output channels; None: x's (CAF's networks read 2C, give C)

    def check(self) -> None:
        """A one-line ValueError for a field value the network does not implement."""
        if self.fir:
            raise ValueError('NCSNpp: fir=True (FIR resampling) is not implemented; use fir=False')
        if self.progressive != 'none' or self.progressive_input != 'none':
            raise ValueError("NCSNpp: only progressive='none' and progressive_input='none' are implemented")
        if self.resblock_type not in ('biggan', 'ddpm'):
            raise ValueError(f"NCSNpp: resblock_type must be 'biggan' or 'ddpm', got {self.resblock_type!r}")
        if self.embedding_type not in ('positional', 'fourier'):
            raise ValueError(f"NCSNpp: embedding_type must be 'positional' or 'fourier', got {self.embedding_type!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f'NCSNpp: dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}')
        p = self.label_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f'label_dropout={p!r}: expected a probability in [0, 1)')
        if p and not self.num_classes:
            raise ValueError(f'label_dropout={p!r}: needs a class-conditional model (num_classes > 0)')

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
                 train: bool = False) -> jax.Array:
        self.check()
        dtype = _DTYPES[self.dtype]
        nf = self.nf
        num_resolutions = len(self.ch_mult)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))

        # Time (and label) embedding, computed in float32.
        temb = None
        if self.conditional:
            if self.embedding_type == 'fourier':
                # Score SDE embeds log(sigma); a flow time lies in [0, 1] (t = 0 allowed), so t is embedded as is.
                temb = GaussianFourierProjection(nf, self.fourier_scale)(t)
            else:
                temb = positional_embedding(999.0 * t, nf)
            temb = _dense(4 * nf, jnp.float32, name='temb_0')(temb)
            temb = _dense(4 * nf, jnp.float32, name='temb_1')(nn.silu(temb))
            if self.num_classes > 0:
                if y is None:
                    raise ValueError('NCSNpp: num_classes > 0 needs labels y')
                if train and self.label_dropout:
                    drop = jax.random.bernoulli(self.make_rng('dropout'), self.label_dropout, y.shape)
                    y = jnp.where(drop, self.num_classes, y)
                rows = self.num_classes + (1 if self.label_dropout else 0)  # the last: the null label
                temb = temb + nn.Embed(rows, 4 * nf, name='label_embed')(y)
            temb = temb.astype(dtype)

        common = dict(dropout=self.dropout, skip_rescale=self.skip_rescale, init_scale=self.init_scale, dtype=dtype)

        def resblock(h: jax.Array, out_ch: int | None = None, up: bool = False, down: bool = False) -> jax.Array:
            # up / down only in the BigGAN layout; the DDPM layout resamples between blocks.
            return ResnetBlock(out_ch=out_ch, up=up, down=down, **common)(h, temb, train)

        def attn(h: jax.Array) -> jax.Array:
            return AttnBlock(skip_rescale=self.skip_rescale, init_scale=self.init_scale, dtype=dtype)(h)

        def downsample(h: jax.Array) -> jax.Array:
            if self.resblock_type == 'biggan':
                return resblock(h, down=True)
            if self.resamp_with_conv:
                return _conv(h.shape[-1], 3, dtype, stride=2)(h)
            return _downsample(h)

        def upsample(h: jax.Array) -> jax.Array:
            if self.resblock_type == 'biggan':
                return resblock(h, up=True)
            h = _upsample(h)
            return _conv(h.shape[-1], 3, dtype)(h) if self.resamp_with_conv else h

        # Downsampling path.
        hs = [_conv(nf, 3, dtype, name='conv_in')(x.astype(dtype))]
        for i_level in range(num_resolutions):
            for _ in range(self.num_res_blocks):
                h = resblock(hs[-1], nf * self.ch_mult[i_level])
                if h.shape[1] in self.attn_resolutions:
                    h = attn(h)
                hs.append(h)
            if i_level != num_resolutions - 1:
                hs.append(downsample(hs[-1]))

        # Middle.
        h = resblock(hs[-1])
        h = attn(h)
        h = resblock(h)

        # Upsampling path: one more block per level, each eating a skip connection.
        for i_level in reversed(range(num_resolutions)):
            for _ in range(self.num_res_blocks + 1):
                h = resblock(jnp.concatenate([h, hs.pop()], axis=-1), nf * self.ch_mult[i_level])
            if h.shape[1] in self.attn_resolutions:
                h = attn(h)
            if i_level != 0:
                h = upsample(h)
        assert not hs

        h = nn.silu(_norm(h.shape[-1], dtype, name='norm_out')(h))
        h = _conv(self.out_channels or x.shape[-1], 3, dtype, init_scale=self.init_scale, name='conv_out')(h)
        return h.astype(jnp.float32)
