"""Writes `torch.save`-style files without torch, for tests of the readers (flowjax.interop.torch_pickle).

`save(obj, path)` writes torch's zip layout: `archive/data.pkl` (protocol 2) naming each numpy array as
`torch._utils._rebuild_tensor_v2` of a typed storage (a persistent id ('storage', torch.<Type>Storage, key,
'cpu', numel)) and one `archive/data/<key>` record of its little-endian bytes. `View` is a tensor of any stride and offset; `Global(module, name)` puts
any other global in a pickle (a class the readers must refuse).
"""

import collections
import io
import pickle
import zipfile

import numpy as np

_STORAGES = {np.dtype('float32'): 'FloatStorage', np.dtype('float64'): 'DoubleStorage',
             np.dtype('int64'): 'LongStorage', np.dtype('float16'): 'HalfStorage'}


class Global:
    """A global name in a pickle, written as GLOBAL module name (never imported here)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # never called: pickle asks a reduce function to be callable
        raise TypeError('a placeholder')


class _Tensor:
    def __init__(self, storage, size, stride, offset=0):
        self.storage, self.size, self.stride, self.offset = storage, size, stride, offset

    def __reduce__(self):
        return (Global('torch._utils', '_rebuild_tensor_v2'),
                (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


class View:
    """A tensor of `size`, `stride` and `offset` (in elements) over the flat array `data` (its storage)."""

    def __init__(self, data: np.ndarray, size, stride, offset: int = 0):
        self.data, self.size, self.stride, self.offset = data, tuple(size), tuple(stride), offset


class _Storage:
    def __init__(self, key: str, data: np.ndarray):
        self.key, self.data = key, data


class _Pickler(pickle._Pickler):  # the pure-Python pickler: its save() can be extended
    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode())
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ('storage', Global('torch', _STORAGES[obj.data.dtype]), obj.key, 'cpu', obj.data.size)
        return None


def _tensors(obj, storages: list):
    if isinstance(obj, View):
        storages.append(_Storage(str(len(storages)), np.ascontiguousarray(obj.data).reshape(-1)))
        return _Tensor(storages[-1], obj.size, obj.stride, obj.offset)
    if isinstance(obj, np.ndarray):
        data = np.ascontiguousarray(obj).reshape(-1).astype(obj.dtype.newbyteorder('<'))
        storages.append(_Storage(str(len(storages)), data))
        stride = [int(np.prod(obj.shape[i + 1:])) for i in range(obj.ndim)]
        return _Tensor(storages[-1], tuple(obj.shape), tuple(stride))
    if isinstance(obj, dict):
        return type(obj)((k, _tensors(v, storages)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tensors(v, storages) for v in obj)
    return obj


def save(obj, path) -> None:
    """Writes `obj` (nested dicts / lists of numpy arrays and plain values, or `Global`s) as torch's zip layout."""
    storages: list[_Storage] = []
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(_tensors(obj, storages))
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('archive/data.pkl', buf.getvalue())
        archive.writestr('archive/byteorder', 'little')
        archive.writestr('archive/version', '3\n')
        for s in storages:
            archive.writestr(f'archive/data/{s.key}', s.data.tobytes())
