"""Orbax checkpoints of the train state, and the exported EMA weights later stages load.

Layout of a workdir:
    checkpoints/<step>/{state,config}   full train state + the config that made it (atomic)
    export/meta.json                    model config and sample shape of the exported weights
    export/params/                      EMA parameters, a standalone Orbax checkpoint
"""

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from flowjax import errors, sharding

# Sections that define what a checkpoint is; a workdir holding another experiment's
# checkpoints is refused rather than mixed: every field must match except these, which a
# resumed run may change (train longer, log or save at another rate, evaluate differently, keep
# compiled programs elsewhere).
RESUMABLE_CHANGES = ('name', 'compile_cache', 'eval', 'train.steps', 'train.log_every', 'train.checkpoint_every',
                     'train.keep_checkpoints', 'train.n_jitted_steps', 'train.remat', 'train.prefetch',
                     'train.nonfinite')


def _jsonable(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json())


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def config_difference(saved: dict, current: dict, defaults: dict | None = None) -> str | None:
    """The first field (dotted) on which two configs differ, ignoring RESUMABLE_CHANGES.

    `current` is the part of the config that defines the run (a method's `identity`: its
    top-level fields and the sections it reads); sections of `saved` outside it (another
    method's, or one this method does not read) are not compared. A field the saved config
    lacks (a checkpoint older than the field) matches while the current value is its value in
    `defaults` (the method's default identity): what the older code did.
    """
    a = _flatten({k: v for k, v in saved.items() if k in current})
    b = _flatten(current)
    defaults = _flatten(defaults or {})
    for field in sorted(set(a) | set(b)):
        if any(field == r or field.startswith(r + '.') for r in RESUMABLE_CHANGES):
            continue
        if field not in a and field in defaults and b.get(field) == defaults[field]:
            continue
        if a.get(field) != b.get(field):
            return field
    return None


class Checkpoints:
    """Periodic, atomic saves of (state, config) under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str | epath.Path, config: ml_collections.ConfigDict,
                 identity: dict | None = None, defaults: dict | None = None):
        """`identity`: the part of `config` a resumed run must match (default: all of it);
        `defaults`: what a field missing from an older checkpoint's config is compared with."""
        self._config = config
        self._identity = _jsonable(config) if identity is None else identity
        self._defaults = defaults
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(config.train.keep_checkpoints),
            save_interval_steps=config.train.checkpoint_every,
            create=True,
            cleanup_tmp_directories=True,  # a save that a kill cut short (never read: not finalized)
        )
        # The items ('state', 'config') and their handlers follow from the args of each save and restore.
        self._manager = ocp.CheckpointManager(epath.Path(workdir) / 'checkpoints', options=options)

    @property
    def directory(self) -> epath.Path:
        return epath.Path(self._manager.directory)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether the save policy (every `train.checkpoint_every` steps, the first step of a fresh
        run, a multi-process preemption sync point) asks for a checkpoint after `step`."""
        return self._manager.should_save(step)

    def restore(self, abstract_state: Any) -> Any | None:
        """The latest saved state (sharded like `abstract_state`), or None in a fresh workdir."""
        step = self._manager.latest_step()
        if step is None:
            return None
        saved = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
        field = config_difference(saved, self._identity, self._defaults)
        if field is not None:
            raise errors.UserError(
                f'{self._manager.directory}: holds checkpoints of a different experiment ({field} differs '
                f'from this config); use a new --workdir or remove that directory')
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored['state']

    def save(self, step: int, state: Any) -> None:
        """Starts saving `state` as `step` (asynchronously; `close` waits); the caller decides when (`due`)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(_jsonable(self._config))),
            force=True)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def export_dir(workdir: str | epath.Path) -> epath.Path:
    return epath.Path(workdir) / 'export'


def is_exported(workdir: str | epath.Path) -> bool:
    path = export_dir(workdir)
    params = path / 'params'
    return (path / 'meta.json').exists() and params.exists() and ocp.utils.is_checkpoint_finalized(params)


def export(workdir: str | epath.Path, params: Any, meta: dict) -> epath.Path:
    """Writes EMA `params` and `meta` to `<workdir>/export`, replacing an export of another step.

    The new export is staged beside the old one and swapped in by renames, so a crash leaves
    either the old export or the new one, never a mix.
    """
    path = export_dir(workdir)
    if is_exported(workdir) and json.loads((path / 'meta.json').read_text()).get('step') == meta['step']:
        return path
    staging = path.parent / f'.export-{meta["step"]}.staging'
    primary = jax.process_index() == 0
    if primary and staging.exists():
        staging.rmtree()
    sharding.barrier('flowjax-export-staging')
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(staging / 'params', params)
    checkpointer.wait_until_finished()
    checkpointer.close()
    if primary:
        (staging / 'meta.json').write_text(json.dumps(meta, indent=2))
        retired = path.parent / '.export-retired'
        if retired.exists():
            retired.rmtree()
        if path.exists():
            path.rename(retired)
        staging.rename(path)
        if retired.exists():
            retired.rmtree()
    sharding.barrier('flowjax-export-done')
    return path


def find_export(path: str | epath.Path) -> tuple[epath.Path, bool]:
    """(the export directory `path` names: itself or its workdir's export/, whether it holds meta.json
    and params/). A relative local path is taken from the working directory (Orbax reads absolute
    paths only)."""
    path = epath.Path(path if '://' in str(path) else os.path.abspath(path))
    if path.name != 'export' and (path / 'export').exists():
        path = path / 'export'
    return path, (path / 'meta.json').exists() and (path / 'params').exists()


def load_export(path: str | epath.Path, abstract_params: Any | None = None) -> tuple[Any, dict]:
    """(params, meta) of an export written by `export` (see `find_export`); a one-line error if it is missing.

    Without `abstract_params` the weights come back as numpy arrays on the host of every process,
    whatever the device topology that saved them (a teacher trained on a pod loads on a laptop);
    the caller places them on its mesh.
    """
    path, found = find_export(path)
    if not found:
        raise errors.UserError(f'{path}: no exported model here (expected meta.json and params/ written '
                               'at the end of a training run, in <workdir>/export)')
    meta = json.loads((path / 'meta.json').read_text())
    checkpointer = ocp.StandardCheckpointer()
    if abstract_params is None:  # numpy leaves: restored on the host, not with the saved shardings
        stored = checkpointer.metadata(path / 'params').item_metadata.tree
        abstract_params = jax.tree.map(lambda a: np.empty(a.shape, a.dtype), stored)
    params = checkpointer.restore(path / 'params', abstract_params)
    checkpointer.close()
    return params, meta
