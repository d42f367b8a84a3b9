"""A flowjax export as one `.safetensors` file, and back (docs/methods.md, Safetensors layout).

    python -m flowjax.interop.safetensors_io export runs/quick/export model.safetensors
    python -m flowjax.interop.safetensors_io import model.safetensors runs/imported

Every model kind (velocity, caf with its two networks, piecewise, ddpm) is written the same way: each leaf of
the export's params tree (the Orbax checkpoint in export/params/) is one tensor named `params/` + the path of
dict keys to it joined by '.' (a velocity MLP's `params/params.Dense_0.kernel`, a CAF model's
`params/velocity.params.Dense_0.kernel` and `params/acceleration.params...`), in its stored dtype (float32 for
every export flowjax trains), and the export's meta.json (the kind and its network configs, the sample shape,
the step, the flow) is the header's metadata `flowjax.meta`, as JSON. Reading it back checks every tensor's
name and shape against the network that meta describes, so the model it gives samples as the export did, bit
for bit (the same params).
"""

import json
import os
import pathlib
import uuid
from typing import Any

import jax
import ml_dtypes
import numpy as np
from etils import epath

from flowjax import checkpoint, errors, interop
from flowjax.models import kinds

PREFIX = 'params/'  # every tensor's name starts with it; then the params tree's path joined by SEPARATOR
SEPARATOR = '.'
META_KEY = 'flowjax.meta'  # the header's metadata: the export's meta.json as JSON
LAYOUT_KEY = 'flowjax.layout'
LAYOUT = '1'
FORMAT = 'flax'  # the header's 'format', as the safetensors libraries of each framework write it
# safetensors dtype names -> numpy (bfloat16 through ml_dtypes, as JAX stores it)
DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16, 'I64': np.int64,
          'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U64': np.uint64, 'U32': np.uint32, 'U16': np.uint16,
          'U8': np.uint8, 'BOOL': np.bool_}


def flatten(params: Any, where: str = 'params') -> dict[str, np.ndarray]:
    """{tensor name: host array} of a params tree of nested dicts (names: PREFIX + keys joined by SEPARATOR)."""
    flat = {}

    def visit(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str) or not key or SEPARATOR in key or '/' in key:
                    raise errors.UserError(f'{where}: key {key!r} at {SEPARATOR.join(path) or "the top"} cannot be '
                                           f'a tensor name part (a non-empty string without {SEPARATOR!r} or "/")')
                visit(value, (*path, key))
        else:
            flat[PREFIX + SEPARATOR.join(path)] = np.ascontiguousarray(np.asarray(node))

    visit(params, ())
    return flat


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """The params tree of `flatten`'s tensors (names without PREFIX are not params)."""
    tree = {}
    for name, value in flat.items():
        *parents, leaf = name[len(PREFIX):].split(SEPARATOR)
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _sample_shape(meta: dict, where: str) -> tuple[int, ...]:
    shape = meta.get('sample_shape')
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise errors.UserError(f'{where}: the meta has no sample_shape (expected a list of sizes, e.g. [32, 32, 3])')
    return tuple(shape)


def kind_of(meta: dict, where: str) -> kinds.Kind:
    """The model kind export `meta` records (`kinds.from_meta`), a field it lacks or a bad value a one-line error."""
    try:
        return kinds.from_meta(meta, where)
    except KeyError as e:
        raise errors.UserError(f"{where}: the meta of a model of kind {meta.get('kind')!r} has no {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise errors.UserError(f'{where}: a bad meta ({e})') from None


def expected_shapes(meta: dict, where: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{tensor name: (shape, dtype)} of the params of the model that export `meta` describes (its kind and
    networks at its sample shape), built without computing them."""
    kind, shape = kind_of(meta, where), _sample_shape(meta, where)
    try:
        abstract = jax.eval_shape(lambda key: kind.init(key, shape), jax.random.key(0))
    except errors.UserError:
        raise
    except Exception as e:  # a network config this code cannot build (an unknown field, a bad size)
        raise errors.UserError(f'{where}: the meta\'s model ({kind.name!r}) cannot be built: {e}') from None
    leaves = jax.tree_util.tree_leaves_with_path(abstract)
    return {PREFIX + SEPARATOR.join(str(k.key) for k in path): (tuple(a.shape), np.dtype(a.dtype))
            for path, a in leaves}


def check_params(flat: dict[str, np.ndarray], meta: dict, where: str) -> None:
    """A one-line UserError unless the tensors are the params of the model `meta` describes: the same names and
    shapes (any dtype: a bfloat16 copy of an export is its weights too)."""
    expected = expected_shapes(meta, where)
    model = f"the meta's model (kind {meta.get('kind', kinds.VelocityField.name)!r})"
    missing = sorted(set(expected) - set(flat))
    if missing:
        raise errors.UserError(f'{where}: has no tensor {missing[0]!r} ({len(missing)} missing), which {model} needs')
    extra = sorted(set(flat) - set(expected))
    if extra:
        raise errors.UserError(f'{where}: tensor {extra[0]!r} is not a parameter of {model}')
    for name, (shape, _) in expected.items():
        if tuple(flat[name].shape) != shape:
            raise errors.UserError(f'{where}: tensor {name!r} has shape {list(flat[name].shape)}, but {model} '
                                   f'expects {list(shape)}')


def save(path: str | os.PathLike, params: Any, meta: dict, where: str = 'params') -> pathlib.Path:
    """Writes `params` and export `meta` (of `where`, for errors) to the safetensors file `path` (whole or not at
    all: a temporary name, then a rename); an existing file is refused, not replaced."""
    from safetensors import numpy as safetensors_numpy

    path = pathlib.Path(os.path.abspath(path))
    if path.exists():
        raise errors.UserError(f'{path}: exists; choose another file name or remove it')
    flat = flatten(params, where)
    check_params(flat, meta, where)
    metadata = {'format': FORMAT, LAYOUT_KEY: LAYOUT, META_KEY: json.dumps(meta, sort_keys=True)}
    tmp = path.parent / f'.{path.name}.tmp-{uuid.uuid4().hex}'
    try:
        safetensors_numpy.save_file(flat, str(tmp), metadata=metadata)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load(path: str | os.PathLike) -> tuple[dict, dict]:
    """(params, meta) of a file `save` wrote: numpy arrays in their stored dtype, checked against the meta's
    model; a file that is not safetensors, has no flowjax meta or does not fit it is a one-line UserError."""
    import safetensors

    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise errors.UserError(f'{path}: no such file (expected a .safetensors file)')
    try:
        with safetensors.safe_open(path, framework='numpy') as f:  # reads the header only
            metadata = f.metadata() or {}
        with open(path, 'rb') as f:
            tensors = safetensors.deserialize(f.read())
    except Exception as e:  # noqa: BLE001 - the library's error for any malformed header or data
        raise errors.UserError(f'{path}: not a safetensors file ({str(e).splitlines()[0] if str(e) else e})') from None
    if META_KEY not in metadata:
        raise errors.UserError(f'{path}: a safetensors file without flowjax meta (no {META_KEY!r} in its metadata); '
                               'it was not written from a flowjax export')
    try:
        meta = json.loads(metadata[META_KEY])
    except ValueError as e:
        raise errors.UserError(f'{path}: its {META_KEY!r} metadata is not JSON ({e})') from None
    if not isinstance(meta, dict):
        raise errors.UserError(f'{path}: its {META_KEY!r} metadata is not a JSON object')
    flat = {}
    for name, info in tensors:
        if info['dtype'] not in DTYPES:
            raise errors.UserError(f'{path}: tensor {name!r} has dtype {info["dtype"]}, which flowjax does not read')
        flat[name] = np.frombuffer(info['data'], DTYPES[info['dtype']]).reshape(info['shape']).copy()
    check_params(flat, meta, str(path))
    return unflatten(flat), meta


def export_to_file(export: str | os.PathLike, out: str | os.PathLike) -> pathlib.Path:
    """Writes the export at `export` (an export directory or its workdir) to the safetensors file `out`."""
    params, meta = checkpoint.load_export(export)
    return save(out, params, meta, str(checkpoint.find_export(export)[0]))


def file_to_export(source: str | os.PathLike, target: str | os.PathLike) -> epath.Path:
    """Writes the safetensors file `source` as an export that every flowjax stage reads: `target`/export (or
    `target` itself when it is named 'export'); an existing export there is refused. Returns its directory."""
    target = epath.Path(os.path.abspath(target) if '://' not in str(target) else target)
    workdir = target.parent if target.name == 'export' else target
    params, meta = load(source)
    existing = checkpoint.export_dir(workdir)
    if existing.exists():
        raise errors.UserError(f'{existing}: exists; import into another directory or remove it')
    if 'step' not in meta:
        raise errors.UserError(f'{source}: its meta has no step (every flowjax export records one)')
    return checkpoint.export(workdir, params, meta)


_Parser = interop.parser_class('python -m flowjax.interop.safetensors_io export EXPORT OUT.safetensors | '
                                 'import IN.safetensors WORKDIR')


def main(argv: list[str] | None = None) -> None:
    """The command line: `export EXPORT OUT.safetensors` or `import IN.safetensors WORKDIR`; bad input is one
    line on stderr and exit status 2."""
    parser = _Parser(prog='python -m flowjax.interop.safetensors_io', description=__doc__.split('\n')[0])
    commands = parser.add_subparsers(dest='command', required=True, parser_class=_Parser)
    out = commands.add_parser('export', help='an export (or its workdir) to a .safetensors file')
    out.add_argument('export')
    out.add_argument('file')
    into = commands.add_parser('import', help='a .safetensors file to WORKDIR/export')
    into.add_argument('file')
    into.add_argument('workdir')
    args = parser.parse_args(argv)
    try:
        if args.command == 'export':
            written = export_to_file(args.export, args.file)
        else:
            written = file_to_export(args.file, args.workdir)
    except errors.UserError as e:
        interop.fail(str(e))
    print(f'flowjax: wrote {written}')


if __name__ == '__main__':
    main()
