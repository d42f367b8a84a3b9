"""Reads PyTorch `.pth` state dicts into numpy arrays, without PyTorch.

Published weights for the metrics (pytorch-fid's Inception, torchvision's VGG16, the `lpips`
heads) are pickled tensors, read by `flowjax.interop.torch_pickle` (both of torch's file layouts;
any class other than tensors and plain containers is refused, so a file cannot run code).
"""

import numpy as np

from flowjax import errors
from flowjax.interop import torch_pickle


def check_state_dict(state_dict: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Every expected tensor is in `state_dict` with its shape; a one-line UserError naming the key if not."""
    for name, shape in shapes.items():
        if name not in state_dict:
            raise errors.UserError(f'{where}: missing key {name!r}')
        if tuple(np.shape(state_dict[name])) != shape:
            raise errors.UserError(f'{where}: {name!r} has shape {tuple(np.shape(state_dict[name]))}, '
                                   f'expected {shape}')


def load_state_dict(path: str, field: str) -> dict[str, np.ndarray]:
    """{name: array} of a `.pth` state dict; `field` names the config field in errors."""
    obj = torch_pickle.load(path, field, 'PyTorch state dict')
    if isinstance(obj, dict) and 'state_dict' in obj and isinstance(obj['state_dict'], dict):
        obj = obj['state_dict']
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise errors.UserError(f'{field}: {path} does not hold a state dict of tensors')
    return dict(obj)
