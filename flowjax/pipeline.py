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
"""

import hashlib
import json
from collections.abc import Callable

import jax
import ml_collections
from absl import logging
from etils import epath

from flowjax import errors

# Fields of a stage config that may name an earlier stage.
REFERENCES = ('generate.teacher', 'reflow.couplings', 'reflow.init', 'reflow.online_teacher',
              'distill.couplings', 'distill.init', 'eval.couplings')
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


def _stage_config(config: ml_collections.ConfigDict, stage: str, dirs: dict[str, epath.Path],
                  fingerprints: dict[str, str]) -> tuple[ml_collections.ConfigDict, str]:
    """The stage's config with stage names replaced by directories, and its fingerprint.

    `fingerprints` holds the stages before this one: a reference to any other is an error.
    """
    if stage not in config:
        raise errors.ConfigError(f'stages: {stage!r} is listed but config.{stage} is not defined')
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
        cfg.eval.models = tuple(path for path, _ in resolved)
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
    so a typo in the last stage does not wait for the first to finish training.
    """
    stages = tuple(config.stages)
    if not stages or len(set(stages)) != len(stages):
        raise errors.ConfigError(f'stages={stages}: expected a non-empty tuple of distinct stage names')
    root = epath.Path(workdir)
    dirs = {name: root / name for name in stages}
    planned, fingerprints = {}, {}
    for stage in stages:  # check every stage before running any
        cfg, fingerprints[stage] = _stage_config(config, stage, dirs, fingerprints)
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
    for stage, cfg in planned.items():
        marker = dirs[stage] / MARKER
        if marker.exists() and json.loads(marker.read_text()).get('fingerprint') == fingerprints[stage]:
            logging.info('stage %s: finished earlier, skipped', stage)
            results[stage] = json.loads(marker.read_text()).get('result', {})
            continue
        logging.info('stage %s: method %s in %s', stage, cfg.method, dirs[stage])
        results[stage] = methods[cfg.method](cfg, str(dirs[stage])) or {}
        if jax.process_index() == 0:
            tmp = dirs[stage] / (MARKER + '.tmp')
            tmp.write_text(json.dumps({'method': cfg.method, 'fingerprint': fingerprints[stage],
                                       'result': results[stage]}, indent=2, default=float))
            tmp.replace(marker)
    _publish_report(root, stages)
    return results


def _publish_report(root: epath.Path, stages: tuple[str, ...]) -> None:
    """Copies the last stage's report (the pipeline's evaluation) to the workdir root."""
    if jax.process_index() != 0:
        return
    for stage in reversed(stages):
        if (root / stage / 'report.json').exists():
            for name in REPORT_FILES:
                if (root / stage / name).exists():
                    (root / stage / name).copy(root / name, overwrite=True)
            return
