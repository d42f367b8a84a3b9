"""uint8 pixels as the float32 values in [-1, 1] that image flows learn (shared by every image source), and back."""

import numpy as np

_FLOAT = np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)  # uint8 -> its float32.


def from_uint8(images: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (one table look-up: i / 127.5 - 1 in float32)."""
    return np.take(_FLOAT, images)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255]: (x + 1) * 127.5 rounded, clipped (from_uint8's inverse on its values)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
