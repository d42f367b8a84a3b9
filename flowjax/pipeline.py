"""Pipelines: an experiment that lists `stages`, each one method run in `<workdir>/<stage>/`.

    config.method = 'pipeline'
    config.stages = ('teacher', 'couplings', 'reflow')
    config.teacher = <a full config, method 'rf'>
    config.couplings = <method 'generate', generate.teacher = 'teacher'>
    ...

A field that names an earlier stage (a teacher, a coupling store, a model to evaluate) is
replaced by that stage's directory. A finished stage leaves `stage.json` with a fingerprint of
its config and of the stages it reads; a rerun skips it while both are unchanged, so a
crashed pipeline resumes at the stage it stopped in (which itself resumes from its checkpoint).

A stage whose `checkpoint` names an existing export (a workdir or its export/ directory, e.g.
`--config.teacher.checkpoint=gs://bucket/rf_cifar`) is not run: references to it read that export,
nothing is written there, and its fingerprint follows the export's path and meta.json.
"""

import hashlib
import json
import time
from collections.abc import Callable

import jax
import ml_collections
from absl import logging
from etils import epath

from flowjax import checkpoint, errors, sharding

# Fields of a stage config that may name an earlier stage.
REFERENCES = ('generate.teacher', 'reflow.couplings', 'reflow.init', 'reflow.online_teacher',
              'distill.couplings', 'distill.init', 'eval.couplings',
              'slimflow_reflow.couplings', 'slimflow_distill.couplings', 'slimflow_distill.init')
MARKER = 'stage.json'
REPORT_FILES = ('report.json', 'report.md', 'samples.png')


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


def _stage_config(config: ml_collections.ConfigDict, stage: str, dirs: dict[str, epath.Path],
                  fingerprints: dict[str, str], standins: set[str]) -> tuple[ml_collections.ConfigDict, str]:
    """The stage's config with stage names replaced by directories, and its fingerprint.

    `fingerprints` holds the stages before this one: a reference to any other is an error.
    An eval.models entry naming a stand-in stage (in `standins`) keeps the stage name as its label.
    """
    unresolved = config[stage].to_json(sort_keys=True)  # stage names, not paths: a moved workdir still matches
    cfg = ml_collections.ConfigDict(config[stage].to_dict())
    depends = []
    for field in REFERENCES:
        section, name = field.split('.')
        if section in cfg and cfg[section].get(name):
            cfg[section][name], ref = _resolve(cfg[section][name], f'{stage}.{field}', dirs)
            depends += [ref] if ref else []
    if 'eval' in cfg and cfg.eval.get('models'):
        resolved = [_resolve(m, f'{stage}.eval.models', dirs) for m in cfg.eval.models]
        cfg.eval.models = tuple(f'{m}={path}' if m in standins else path
                                for m, (path, _) in zip(cfg.eval.models, resolved))
        depends += [ref for _, ref in resolved if ref]
    for ref in depends:
        if ref not in fingerprints:
            raise errors.ConfigError(f'{stage}: refers to stage {ref!r}, which does not run before it')
    text = unresolved + ''.join(fingerprints[r] for r in sorted(set(depends)))
    return cfg, hashlib.sha256(text.encode()).hexdigest()[:16]


def run(config: ml_collections.ConfigDict, workdir: str, methods: dict[str, Callable],
        checks: dict[str, Callable] | None = None) -> dict:
    """Runs `config.stages` in order, skipping stages finished with the same fingerprint.

    `checks` (method -> static config check) run for every stage before the first one starts,
    so a typo in the last stage does not wait for the first to finish training. A stage with
    `checkpoint` set stands in for that export: it is neither checked nor run.
    """
    stages = tuple(config.stages)
    if not stages or len(set(stages)) != len(stages):
        raise errors.ConfigError(f'stages={stages}: expected a non-empty tuple of distinct stage names')
    root = epath.Path(workdir)
    dirs = {name: root / name for name in stages}
    planned, fingerprints, standins = {}, {}, set()
    for stage in stages:  # check every stage before running any
        if stage not in config:
            raise errors.ConfigError(f'stages: {stage!r} is listed but config.{stage} is not defined')
        if config[stage].get('checkpoint'):
            dirs[stage] = epath.Path(config[stage].checkpoint)
            text = str(dirs[stage]) + '\n' + _export_meta(stage, dirs[stage])
            fingerprints[stage] = hashlib.sha256(text.encode()).hexdigest()[:16]
            standins.add(stage)
            continue
        cfg, fingerprints[stage] = _stage_config(config, stage, dirs, fingerprints, standins)
        if cfg.get('method') not in methods or cfg.method == 'pipeline':
            raise errors.ConfigError(f'{stage}.method: unknown method {cfg.get("method")!r} '
                                     f"(expected one of {', '.join(m for m in methods if m != 'pipeline')})")
        if checks and cfg.method in checks:
            try:
                checks[cfg.method](cfg)
            except errors.UserError as e:
                raise errors.ConfigError(f'{stage}.{e}') from None
        planned[stage] = cfg
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
        results[stage] = methods[cfg.method](cfg, str(dirs[stage])) or {}
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
