"""Bilinear resizing exactly as torch's `F.interpolate(mode='bilinear', align_corners=False)`.

The metric networks (FID's Inception, LPIPS) were defined on torch-resized inputs; torch does
not antialias when it downsamples (`jax.image.resize` does), so the weights are written here.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def _matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) interpolation weights along one axis (half-pixel centres, edges clamped)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(matrix, (np.arange(n_out), hi), frac)
    return matrix.astype(np.float32)


def bilinear(x: jax.Array, size: int, precision=jax.lax.Precision.HIGHEST) -> jax.Array:
    """(B, H, W, C) -> (B, size, size, C); an axis already of that size is left alone."""
    if x.shape[1] != size:
        x = jnp.einsum('oh,bhwc->bowc', _matrix(x.shape[1], size), x, precision=precision)
    if x.shape[2] != size:
        x = jnp.einsum('ow,bhwc->bhoc', _matrix(x.shape[2], size), x, precision=precision)
    return x
