"""Pipelines: an experiment that lists `stages`, each one method run in `<workdir>/<stage>/`.

    config.method = 'pipeline'
    config.stages = ('teacher', 'couplings', 'reflow')
    config.teacher = <a full config, method 'rf'>
    config.couplings = <method 'generate', generate.teacher = 'teacher'>
    ...

A field that names an earlier stage (a teacher, a coupling store, a model to evaluate; each
method declares these fields, `method.Method.references`) is replaced by that stage's
directory; any other field of the stage's own section that holds an earlier stage's name is an
error before anything runs. A finished stage leaves `stage.json` with a fingerprint of its
identity (its top-level fields and the sections its method reads, `method.Method.identity`) and
of the stages it reads; a rerun skips it while both are unchanged, so a crashed pipeline resumes
at the stage it stopped in (which itself resumes from its checkpoint), and a change to a section
the stage does not read reruns nothing.

A stage whose `checkpoint` names an existing export (a workdir or its export/ directory, e.g.
`--config.teacher.checkpoint=gs://bucket/rf_cifar`) is not run: references to it read that export,
nothing is written there, and its fingerprint follows the export's path and meta.json.
"""

import dataclasses
import hashlib
import json
import time
from collections.abc import Mapping

import jax
import ml_collections
from absl import logging
from etils import epath

from flowjax import checkpoint, compile_cache, errors, sharding
from flowjax.methods import method as method_lib, table

MARKER = 'stage.json'
REPORT_FILES = ('report.json', 'report.md', 'samples.png', 'quality_nfe.png')  # quality_nfe.png: method compare's


def _resolve(value: str, field: str, dirs: dict[str, epath.Path]) -> tuple[str, str | None]:
    """(path, referenced stage or None) for a field value that is a stage name or a path."""
    whole = value in dirs or epath.Path(value).exists()
    label, sep, target = ('', '', value) if whole else value.partition('=')
    target = target if sep else value
    if target in dirs:
        path = str(dirs[target])
        return (f'{label}={path}' if sep else path), target
    if not epath.Path(target).exists():
        raise errors.ConfigError(f'{field}={target!r}: neither an earlier stage nor an existing directory')
    return value, None


def _export_meta(stage: str, path: epath.Path) -> str:
    """The meta.json text of the export at `path` (as `checkpoint.load_export` finds it), for `<stage>.checkpoint`."""
    export, found = checkpoint.find_export(path)
    if not found:
        raise errors.ConfigError(f'{stage}.checkpoint={path}: no exported model here '
                                 f'(expected {path}/export/meta.json or {path}/meta.json)')
    return (export / 'meta.json').read_text()


def _stage_config(config: ml_collections.ConfigDict, stage: str, method: method_lib.Method,
                  dirs: dict[str, epath.Path], fingerprints: dict[str, str],
                  standins: set[str]) -> tuple[ml_collections.ConfigDict, str]:
    """The stage's config with stage names replaced by directories, and its fingerprint.

    Only the fields `method` declares as references are resolved; `fingerprints` holds the stages
    before this one: a reference to any other is an error. An entry of a tuple reference (eval.models)
    naming a stand-in stage (in `standins`) keeps the stage name as its label; one of the method's
    `reserved` entries is left as it is.
    """
    cfg = ml_collections.ConfigDict(config[stage].to_dict())
    # stage names, not paths: a moved workdir still matches
    unresolved = json.dumps(method.identity(cfg), sort_keys=True)
    depends = []
    for field in method.references:
        section, name = field.split('.')
        value = cfg[section].get(name) if section in cfg else None
        if isinstance(value, str) and value:
            cfg[section][name], ref = _resolve(value, f'{stage}.{field}', dirs)
            depends += [ref] if ref else []
        elif isinstance(value, (tuple, list)) and value:
            resolved = [(v, None) if v in method.reserved else _resolve(v, f'{stage}.{field}', dirs) for v in value]
            cfg[section][name] = tuple(f'{v}={path}' if v in standins else path
                                       for v, (path, _) in zip(value, resolved))
            depends += [ref for _, ref in resolved if ref]
    _check_undeclared(cfg, stage, method, fingerprints)
    for ref in depends:
        if ref not in fingerprints:
            raise errors.ConfigError(f'{stage}: refers to stage {ref!r}, which does not run before it')
    text = unresolved + ''.join(fingerprints[r] for r in sorted(set(depends)))
    return cfg, hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_undeclared(cfg: ml_collections.ConfigDict, stage: str, method: method_lib.Method,
                      earlier: Mapping[str, str]) -> None:
    """A field of the method's own section holding an earlier stage's name, that the method does
    not declare as a reference, would be read as a path: refused before any stage runs."""
    if method.name not in cfg or not isinstance(cfg[method.name], ml_collections.ConfigDict):
        return
    for name, value in cfg[method.name].items():
        field = f'{method.name}.{name}'
        values = value if isinstance(value, (tuple, list)) else (value,)
        named = [v for v in values if isinstance(v, str) and v in earlier]
        if named and field not in method.references:
            raise errors.ConfigError(f'{stage}.{field}={named[0]!r} names a stage, but method {method.name!r} '
                                     'does not declare that field as a reference (method.Method.references)')


@dataclasses.dataclass(frozen=True)
class Plan:
    """The checked stages of a pipeline: each stage's config with references resolved, its
    fingerprint and directory; stand-in stages (`<stage>.checkpoint`) are not in `configs`."""

    stages: tuple[str, ...]
    configs: dict[str, ml_collections.ConfigDict]
    fingerprints: dict[str, str]
    dirs: dict[str, epath.Path]
    standins: frozenset[str]


def plan(config: ml_collections.ConfigDict, workdir: str,
         methods: Mapping[str, method_lib.Method] | None = None) -> Plan:
    """Resolves and checks every stage of `config.stages` (nothing runs, nothing is written)."""
    methods = table.METHODS if methods is None else methods
    stages = tuple(config.stages)
    if not stages or len(set(stages)) != len(stages):
        raise errors.ConfigError(f'stages={stages}: expected a non-empty tuple of distinct stage names')
    compile_cache.check_stages(config)
    root = epath.Path(workdir)
    dirs = {name: root / name for name in stages}
    planned, fingerprints, standins = {}, {}, set()
    for stage in stages:
        if stage not in config:
            raise errors.ConfigError(f'stages: {stage!r} is listed but config.{stage} is not defined')
        if config[stage].get('checkpoint'):
            dirs[stage] = epath.Path(config[stage].checkpoint)
            text = str(dirs[stage]) + '\n' + _export_meta(stage, dirs[stage])
            fingerprints[stage] = hashlib.sha256(text.encode()).hexdigest()[:16]
            standins.add(stage)
            continue
        name = config[stage].get('method')
        if name not in methods:
            raise errors.ConfigError(f'{stage}.method: unknown method {name!r} '
                                     f"(expected one of {', '.join(methods)})")
        cfg, fingerprints[stage] = _stage_config(config, stage, methods[name], dirs, fingerprints, standins)
        try:
            methods[name].check(cfg)
        except errors.UserError as e:
            raise errors.ConfigError(f'{stage}.{e}') from None
        planned[stage] = cfg
    return Plan(stages, planned, fingerprints, dirs, frozenset(standins))


def run(config: ml_collections.ConfigDict, workdir: str,
        methods: Mapping[str, method_lib.Method] | None = None) -> dict:
    """Runs `config.stages` in order, skipping stages finished with the same fingerprint.

    Every stage's method (from `methods`, default the table) checks its config before the first
    stage starts (`plan`), so a typo in the last stage does not wait for the first to finish
    training. A stage with `checkpoint` set stands in for that export: it is neither checked nor run.
    """
    methods = table.METHODS if methods is None else methods
    p = plan(config, workdir, methods)
    stages, planned, fingerprints, dirs, standins = p.stages, p.configs, p.fingerprints, p.dirs, p.standins
    root = epath.Path(workdir)
    results = {}
    for stage in stages:
        if stage in standins:
            logging.info('stage %s: using the export in %s', stage, dirs[stage])
            results[stage] = {'checkpoint': str(dirs[stage])}
            continue
        cfg, marker = planned[stage], dirs[stage] / MARKER
        if marker.exists() and json.loads(marker.read_text()).get('fingerprint') == fingerprints[stage]:
            logging.info('stage %s: finished earlier, skipped', stage)
            results[stage] = json.loads(marker.read_text()).get('result', {})
            continue
        logging.info('stage %s: method %s in %s', stage, cfg.method, dirs[stage])
        started = time.monotonic()
        results[stage] = methods[cfg.method].run(cfg, str(dirs[stage])) or {}
        seconds = time.monotonic() - started
        logging.info('stage %s: done in %.1f s', stage, seconds)
        if jax.process_index() == 0:
            tmp = dirs[stage] / (MARKER + '.tmp')
            tmp.write_text(json.dumps({'method': cfg.method, 'fingerprint': fingerprints[stage],
                                       'result': results[stage], 'seconds': seconds}, indent=2, default=float))
            tmp.replace(marker)
        sharding.barrier(f'flowjax-stage-{stage}')  # every process sees the same markers and outputs
    _publish_report(root, tuple(s for s in stages if s not in standins))
    sharding.barrier('flowjax-pipeline-report')
    return results


def _publish_report(root: epath.Path, stages: tuple[str, ...]) -> None:
    """Copies the last stage's report (the pipeline's evaluation) to the workdir root."""
    if jax.process_index() != 0:
        return
    for stage in reversed(stages):
        if (root / stage / 'report.json').exists():
            for name in REPORT_FILES:  # each copied whole or not at all: a killed rerun copies it again
                if (root / stage / name).exists():
                    tmp = root / (name + '.tmp')
                    (root / stage / name).copy(tmp, overwrite=True)
                    tmp.replace(root / name)
            return
