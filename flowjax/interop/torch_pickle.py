"""Reads files written by `torch.save` into numpy arrays, without PyTorch.

Both of torch's file layouts are read: the zip archive (torch >= 1.6: `<name>/data.pkl` and one
`<name>/data/<key>` record of raw bytes per storage) and the older single pickle stream followed by
the raw storages. The pickle is read by a restricted unpickler: tensors (`torch._utils._rebuild_tensor`,
`_rebuild_tensor_v2`, `_rebuild_parameter`) become numpy arrays (little-endian, their size, stride and
storage offset honoured), ordered dicts and plain Python values stay as they are, and any other class
named in the pickle is refused, so a file cannot run code. What comes back is the saved object (a state
dict, or a training checkpoint holding several) with numpy arrays where it had tensors.
"""

import collections
import io
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

from flowjax import errors

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# torch's typed storage classes -> the little-endian numpy dtype of their bytes
DTYPES = {
    'DoubleStorage': '<f8', 'FloatStorage': '<f4', 'HalfStorage': '<f2', 'BFloat16Storage': ml_dtypes.bfloat16,
    'LongStorage': '<i8', 'IntStorage': '<i4', 'ShortStorage': '<i2', 'CharStorage': 'i1', 'ByteStorage': 'u1',
    'BoolStorage': '?',
}
_TORCH_DTYPES = ('float64', 'float32', 'float16', 'bfloat16', 'int64', 'int32', 'int16', 'int8', 'uint8', 'bool')


class _Storage:
    """A flat typed buffer, filled in once its bytes are read."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self.data: np.ndarray | None = None


class _Lazy:
    """A tensor as (storage, offset, size, stride), resolved to an array after the storages are read."""

    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise pickle.UnpicklingError('a tensor whose storage has no data')
        if len(self.size) != len(self.stride) or any(d < 0 for d in self.size) or any(s < 0 for s in self.stride):
            raise pickle.UnpicklingError(f'a tensor of bad size {self.size} / stride {self.stride}')
        if 0 in self.size:
            return np.zeros(self.size, data.dtype)
        last = self.offset + sum((d - 1) * s for d, s in zip(self.size, self.stride))
        if self.offset < 0 or last >= data.size:
            raise pickle.UnpicklingError(f'a tensor of size {self.size} at offset {self.offset} runs past its '
                                         f'storage of {data.size} elements')
        if not self.size:
            return np.array(data[self.offset])
        item = data.itemsize
        view = np.lib.stride_tricks.as_strided(data[self.offset:], shape=self.size,
                                               strides=[s * item for s in self.stride])
        return np.array(view, dtype=data.dtype.newbyteorder('=') if data.dtype.kind in 'fiu' else data.dtype)


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *unused) -> _Lazy:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError('a tensor without a storage')
    return _Lazy(storage, offset, size, stride)


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
        if module == 'torch' and (name in DTYPES or name in _TORCH_DTYPES):
            return name
        raise pickle.UnpicklingError(f'unsupported object {module}.{name} (only tensors and plain containers are read)')

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) < 3 or pid[0] != 'storage' or pid[1] not in DTYPES:
            raise pickle.UnpicklingError(f'unsupported storage {pid[:2] if isinstance(pid, tuple) else pid!r}')
        key = str(pid[2])
        if key not in self._storages:
            self._storages[key] = _Storage(DTYPES[pid[1]])
            self._load_storage(key, self._storages[key])
        return self._storages[key]


def _read_zip(raw: bytes) -> Any:
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith('/data.pkl') or n == 'data.pkl'), None)
        if pkl is None:
            raise pickle.UnpicklingError('a zip archive without data.pkl')
        prefix = pkl[:-len('data.pkl')]
        order = f'{prefix}byteorder'
        if order in names and archive.read(order).strip() not in (b'little', b''):
            raise pickle.UnpicklingError(f'byte order {archive.read(order).decode(errors="replace")!r} '
                                         '(only little-endian files are read)')

        def load(key, storage):
            name = f'{prefix}data/{key}'
            if name not in names:
                raise pickle.UnpicklingError(f'storage record {name} is missing')
            storage.data = np.frombuffer(archive.read(name), storage.dtype)

        return _Unpickler(io.BytesIO(archive.read(pkl)), {}, load).load()


def _read_legacy(raw: bytes) -> Any:
    f = io.BytesIO(raw)
    if pickle.load(f) != _LEGACY_MAGIC:
        raise pickle.UnpicklingError('not a PyTorch file (bad magic number)')
    pickle.load(f)  # protocol version
    info = pickle.load(f)  # system info
    if isinstance(info, dict) and info.get('little_endian') is False:
        raise pickle.UnpicklingError('a big-endian file (only little-endian files are read)')
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


def _resolve(obj: Any) -> Any:
    if isinstance(obj, _Lazy):
        return obj.array()
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    return obj


def loads(raw: bytes) -> Any:
    """The object saved in the bytes of a `torch.save` file, tensors as numpy arrays (pickle, zip or
    struct errors for anything else)."""
    obj = _read_zip(raw) if zipfile.is_zipfile(io.BytesIO(raw)) else _read_legacy(raw)
    return _resolve(obj)


def load(path: str, field: str, what: str = 'PyTorch file') -> Any:
    """The object saved in the `torch.save` file `path`; a missing or unreadable file is a one-line
    UserError naming `field` (the config field or option that named it) and `what` was expected."""
    file = epath.Path(path)
    if not file.exists() or file.is_dir():
        raise errors.UserError(f'{field}: no such file {file}')
    raw = file.read_bytes()
    try:
        return loads(raw)
    except Exception as e:  # pickle, zip and struct errors: all mean an unreadable file
        raise errors.UserError(f"{field}: {file} is not a readable {what} "
                               f"({type(e).__name__}: {' '.join(str(e).split())})") from None
