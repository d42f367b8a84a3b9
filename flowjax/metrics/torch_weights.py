"""Reads PyTorch `.pth` state dicts into numpy arrays, without PyTorch.

Published weights for the metrics (pytorch-fid's Inception, torchvision's VGG16, the `lpips`
heads) are pickled tensors. Both of torch's file layouts are read: the zip archive (torch >= 1.6)
and the older single pickle stream followed by raw storages. Only tensors and plain containers
are rebuilt; any other class named in the pickle is refused, so a file cannot run code.
"""

import collections
import io
import pickle
import struct
import zipfile

import numpy as np
from etils import epath

from flowjax import errors

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'LongStorage': np.int64, 'IntStorage': np.int32, 'ShortStorage': np.int16,
    'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class _Storage:
    """A flat typed buffer, filled in once its bytes are read."""

    def __init__(self, dtype: np.dtype):
        self.dtype = np.dtype(dtype)
        self.data: np.ndarray | None = None


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *unused) -> np.ndarray:
    """A lazy view: (storage, offset, size, stride), resolved after the storages are read."""
    return _Lazy(storage, offset, tuple(size), tuple(stride))


class _Lazy:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def array(self) -> np.ndarray:
        data = self.storage.data
        item = data.itemsize
        if not self.size:
            return np.array(data[self.offset])
        return np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size, strides=[s * item for s in self.stride]).copy()


def _rebuild_parameter(tensor, requires_grad=None, hooks=None, *unused):
    return tensor


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict, load_storage):
        super().__init__(file)
        self._storages = storages
        self._load_storage = load_storage

    def find_class(self, module: str, name: str):
        if module == 'collections' and name == 'OrderedDict':
            return collections.OrderedDict
        if module == 'torch._utils' and name in ('_rebuild_tensor', '_rebuild_tensor_v2'):
            return _rebuild_tensor
        if module == 'torch._utils' and name == '_rebuild_parameter':
            return _rebuild_parameter
        if module == 'torch' and name in _DTYPES:
            return name
        if module == 'torch' and name in ('float32', 'float16', 'float64'):
            return name
        raise pickle.UnpicklingError(f'unsupported object {module}.{name}')

    def persistent_load(self, pid):
        kind, storage_type, key = pid[0], pid[1], str(pid[2])
        if kind != 'storage' or storage_type not in _DTYPES:
            raise pickle.UnpicklingError(f'unsupported storage {pid[:2]}')
        if key not in self._storages:
            self._storages[key] = _Storage(_DTYPES[storage_type])
            self._load_storage(key, self._storages[key])
        return self._storages[key]


def _read_zip(raw: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        names = archive.namelist()
        pkl = next(n for n in names if n.endswith('/data.pkl') or n == 'data.pkl')
        prefix = pkl[:-len('data.pkl')]

        def load(key, storage):
            storage.data = np.frombuffer(archive.read(f'{prefix}data/{key}'), storage.dtype)

        return _Unpickler(io.BytesIO(archive.read(pkl)), {}, load).load()


def _read_legacy(raw: bytes) -> dict:
    f = io.BytesIO(raw)
    if pickle.load(f) != _LEGACY_MAGIC:
        raise pickle.UnpicklingError('not a PyTorch file (bad magic number)')
    pickle.load(f)  # protocol version
    pickle.load(f)  # system info
    storages: dict[str, _Storage] = {}
    result = _Unpickler(f, storages, lambda key, storage: None).load()
    for key in pickle.load(f):  # storage keys, in the order their bytes follow
        storage = storages[str(key)]
        (count,) = struct.unpack('<q', f.read(8))
        nbytes = count * storage.dtype.itemsize
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise pickle.UnpicklingError('file is truncated')
        storage.data = np.frombuffer(buf, storage.dtype)
    return result


def _resolve(obj):
    if isinstance(obj, _Lazy):
        return obj.array()
    if isinstance(obj, dict):
        return {k: _resolve(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    return obj


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
    file = epath.Path(path)
    if not file.exists():
        raise errors.UserError(f'{field}: no such file {file}')
    raw = file.read_bytes()
    try:
        obj = _read_zip(raw) if zipfile.is_zipfile(io.BytesIO(raw)) else _read_legacy(raw)
        obj = _resolve(obj)
    except Exception as e:  # pickle, zip and struct errors: all mean an unreadable file
        raise errors.UserError(f"{field}: {file} is not a readable PyTorch state dict "
                               f"({type(e).__name__}: {' '.join(str(e).split())})") from None
    if isinstance(obj, dict) and 'state_dict' in obj and isinstance(obj['state_dict'], dict):
        obj = obj['state_dict']
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise errors.UserError(f'{field}: {file} does not hold a state dict of tensors')
    return dict(obj)
