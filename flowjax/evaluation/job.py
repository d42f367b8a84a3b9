"""The evaluation job shared by every data kind: sample, score, straightness, report.

Every model is sampled with every sampler of `eval.samplers` from the data kind's fixed starts
(the same for every model) and scored by the kind's metric suite (`SUITES`); with
`eval.reconstruction` / `eval.preservation` the same sampler also regenerates held-out data and
samples a coupling store's first pairs (`fidelity`), scored by the suite against their targets. The
job adds the straightness of its Euler paths, its parameter count and the suite's floor, merges the
entries into the workdir's report and writes report.json, report.md and the suite's samples.png (also an
image in the workdir's TensorBoard events).

With several processes the image work is split, not repeated: every batch is a global array sharded
over all devices, each process samples the rows its devices hold and embeds or scores only those, and
what the metrics need of all rows (features, per-example scores, per-path deviations) is all-gathered
in row order (`sharding.gather`), never the images, so every process ends with the same report;
process 0 writes the files. Toy data's one small chunk is sampled whole by each process (toy.py).
"""

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from flowjax import errors, progress, sharding, writers
from flowjax.data import datasets
from flowjax.evaluation import fidelity, images, report, straightness, toy
from flowjax.flows import solvers
from flowjax.models import kinds

# (apply, params), or (apply, params, num_classes) for a class-conditional model.
Model = kinds.Model | tuple[Any, ...]  # a tuple: (apply, params[, num_classes]), see kinds.as_model


class Suite(Protocol):
    """What a data kind brings to the job: its starts, metrics, floor and figure."""

    floor: dict[str, float]  # the held-out data's own scores (the `*_data` entries)
    num_samples: int  # the examples of all chunks of `starts` (what a sampler's progress counts to)
    straightness_rows: int | None  # rows of the first start batch the straightness path runs on (None: all)
    diverged_straightness_as_null: bool  # a non-finite straightness is reported as null (else as NaN)

    def starts(self) -> Iterator[tuple[jax.Array, int]]:
        """(x0, how many of its rows are examples) per chunk; the same for every model and sampler."""

    def labels(self, chunk: int, classes: int) -> jax.Array:
        """The class labels of a chunk's samples, for a class-conditional model."""

    def measure(self, x1: jax.Array, valid: int) -> Any:
        """This process's part of what `score` needs of a chunk's first `valid` samples (the samples themselves,
        or their features, of the rows its devices hold)."""

    def score(self, measures: list, nfe: int) -> dict[str, Any]:
        """One sampler's report cell from every chunk's measure, combined over the processes (the same cell on
        every process): {metric: value, 'nfe': nfe}."""

    def held_out(self, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        """`count` held-out real examples (float32) and their labels (None without), for eval.reconstruction."""

    def chunks(self, rows: Sequence[np.ndarray]) -> Iterator[tuple[tuple[jax.Array, ...], int]]:
        """Host arrays of equal length in chunks placed as the starts are: (the chunk of each, real rows)."""

    def compare(self, x: jax.Array, target: jax.Array, valid: int) -> dict[str, np.ndarray]:
        """{score: per-example values (float64)} of a chunk's outputs against its targets, first `valid` rows, on
        every process (each scores the rows it holds)."""

    def shown(self, x1: jax.Array, valid: int) -> np.ndarray:
        """The samples of the first chunk (`valid` of its rows are examples) that the figure shows."""

    def panels(self, flow: 'Flow', shown: Mapping[str, np.ndarray]) -> Any:
        """One model's part of the figure, from its shown samples per sampler."""

    def figure(self, path: epath.Path, results: Mapping[str, dict], panels: Mapping[str, Any], title: str) -> None:
        """Writes the figure of every model's panels."""


# data.kind -> its suite: `check(config)` (static) and `prepare(config, workdir) -> Suite`.
SUITES = {
    'toy2d': toy.PointCloudSuite,
    'image': images.ImageSuite,
}


def parse_samplers(config: ml_collections.ConfigDict, specs: Sequence[str] | None = None,
                   field: str = 'eval.samplers') -> list[solvers.Sampler]:
    """Sampler specs (`config.eval.samplers` unless `specs` of config field `field` are given) as Sampler
    objects, rk45 with eval.rtol / eval.atol; a bad spec is a one-line config error naming the field."""
    try:
        return [solvers.parse_sampler(s, rtol=config.eval.rtol, atol=config.eval.atol)
                for s in (config.eval.samplers if specs is None else specs)]
    except ValueError as e:
        raise errors.ConfigError(f'{field}: {e}') from None


def check_data(config: ml_collections.ConfigDict) -> None:
    """Static checks of the data and evaluation fields a training method evaluates with."""
    datasets.check(config)
    parse_samplers(config)
    kinds.check_guidance(config.eval.get('guidance', 1.0), 'eval.guidance')
    fidelity.check(config)
    SUITES[config.data.kind].check(config)


def parameter_count(params: Any) -> int:
    """The number of scalar parameters of a params pytree (the sum of its leaves' sizes)."""
    return sum(math.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params))


class Flow:
    """One entry of `models` as the job samples it, through its model kind: the one place that
    opens a model entry (a `kinds.Model`, or an `(apply, params[, num_classes])` tuple).

    A class-conditional model's chunk i gets the labels `labels(i, num_classes)`, passed with the
    params so that one compiled sampler serves every chunk.
    """

    def __init__(self, model: Model, labels: Callable[[int, int], jax.Array], eps: float, guidance: float = 1.0,
                 name: str = 'the model'):
        model = kinds.as_model(model)
        kind = kinds.guided(model.kind, guidance, 'eval.guidance', f'model {name!r}')
        self.kind, self.params, self.eps = kind, model.params, eps
        self._labels, self._classes = labels, model.kind.num_classes

    def _label(self, chunk: int) -> jax.Array | None:
        return self._labels(chunk, self._classes) if self._classes else None

    def sample(self, sampler: solvers.Sampler, x0: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
        """(x1, nfe): the samples of chunk `chunk` from its starts x0."""
        return kind_function(self.kind, 'sample', sampler, self.eps)(self.params, x0, self._label(chunk))

    def labelled(self, label: jax.Array | None) -> jax.Array | None:
        """Given labels (e.g. stored ones) for a class-conditional model, None for an unconditional one."""
        return label if self._classes else None

    def reconstruct(self, sampler: solvers.Sampler, x1: jax.Array,
                    label: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """(x1 regenerated, nfe): data inverted to noise and sampled back, through the kind."""
        return kind_function(self.kind, 'reconstruct', sampler, self.eps)(self.params, x1, self.labelled(label))

    def sample_from(self, sampler: solvers.Sampler, x0: jax.Array,
                    label: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        """(x1, nfe): samples from given starts (e.g. stored x0) with given labels."""
        return kind_function(self.kind, 'sample', sampler, self.eps)(self.params, x0, self.labelled(label))

    def path(self, steps: int, x0: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
        """(xs, vs): the kind's Euler path from its start to 1 in `steps` steps and its step velocities."""
        return _kind_path(self.kind, steps, self.eps)(self.params, x0, self._label(chunk))

    @property
    def duration(self) -> float:
        """The length of the time interval the kind's solves cover (1 - eps for a velocity field)."""
        return 1.0 - self.kind.start(self.eps)


@functools.lru_cache(maxsize=128)
def kind_function(kind: kinds.Kind, operation: str, sampler: solvers.Sampler, eps: float):
    """Jitted `(params, x, labels) -> (x_out, nfe)` of `kind.<operation>` ('sample', 'invert' or
    'reconstruct') with `sampler`: params traced, one compile per (kind, operation, sampler); labels
    (None for an unconditional model) cut to x's rows."""
    run = getattr(kind, operation)

    @jax.jit
    def fn(params, x, label):
        return run(params, x, sampler, eps=eps, label=None if label is None else label[:len(x)])

    return fn


@functools.lru_cache(maxsize=64)
def _kind_path(kind: kinds.Kind, steps: int, eps: float):
    """Jitted `(params, x0, labels) -> (xs, vs)`: the kind's Euler path from eps to 1."""

    @jax.jit
    def fn(params, x0, label):
        return kind.path(params, x0, steps, eps=eps, label=None if label is None else label[:len(x0)])

    return fn


def mean_nfe(nfes: Sequence[int]) -> int:
    return int(round(float(np.mean(nfes))))


def _score_sampler(flow: Flow, sampler: solvers.Sampler, suite: Suite,
                   name: str) -> tuple[dict[str, Any], np.ndarray]:
    """(report cell, shown samples) of one model and sampler, over all chunks of the suite's starts: each process
    samples and measures the rows of every chunk that its devices hold, and the suite's score combines them."""
    measures, nfes, shown, held, count = [], [], None, 0, 0
    done = progress.Progress(f'evaluate {name} {sampler.key}', suite.num_samples, unit='samples')
    for chunk, (x0, valid) in enumerate(suite.starts()):
        x1, nfe = flow.sample(sampler, x0, chunk)
        shown = suite.shown(x1, valid) if shown is None else shown
        measures.append(suite.measure(x1, valid))
        held, count = held + sharding.held_rows(x1, valid), count + valid
        nfes.append(int(nfe))
        done.update(valid)
    logging.info('evaluate %s %s: %d of %d examples sampled on process %d', name, sampler.key, held, count,
                 jax.process_index())
    return suite.score(measures, mean_nfe(nfes)), shown


def class_labels(classes: int, labels: np.ndarray | None, where: str, source: str) -> np.ndarray | None:
    """The labels of examples from `source` for a model of `classes` classes: None for an unconditional model
    (0); else `labels`, checked (a one-line UserError starting with `where` if there are none, or some
    outside 0..classes-1)."""
    if not classes:
        return None
    if labels is None:
        raise errors.UserError(f'{where}: a class-conditional model (num_classes={classes}) needs labels, and '
                               f'{source} has none')
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise errors.UserError(f'{where}: {source} has labels outside 0..{classes - 1} '
                               f'(the model has num_classes={classes})')
    return labels


def _score_tasks(flow: Flow, sampler: solvers.Sampler, suite: Suite, tasks: Sequence[fidelity.Task],
                 name: str) -> dict[str, Any]:
    """{'<task>_<score>': mean over the task's examples, '<task>_nfe'} of one model and sampler
    (docs/methods.md, Metrics): reconstruction through `kind.reconstruct`, preservation through `kind.sample`."""
    cell = {}
    for task in tasks:
        labels = class_labels(flow.kind.num_classes, task.labels, f'evaluate {name}: eval.{task.name}', task.source)
        rows = [task.inputs, task.targets] + ([] if labels is None else [labels])
        scores, nfes = {}, []
        done = progress.Progress(f'evaluate {name} {sampler.key} {task.name}', len(task.inputs), unit='examples')
        for (x, target, *label), valid in suite.chunks(rows):
            run = flow.reconstruct if task.round_trip else flow.sample_from
            out, nfe = run(sampler, x, label[0] if label else None)
            for score, values in suite.compare(out, target, valid).items():
                scores.setdefault(score, []).append(values)
            nfes.append(int(nfe))
            done.update(valid)
        for score, values in scores.items():
            cell[f'{task.name}_{score}'] = report.finite_or_none(float(np.mean(np.concatenate(values))))
        cell[f'{task.name}_nfe'] = mean_nfe(nfes)
    return cell


def _straightness(flow: Flow, suite: Suite, steps: int) -> dict[str, float | None]:
    """{'straightness', 'straightness_norm'} of the model's Euler paths from the first chunk's starts (its
    examples, or its first `suite.straightness_rows` rows): each process takes the paths its devices hold, and
    their per-step deviations are gathered."""
    x0, valid = next(iter(suite.starts()))
    count = valid if suite.straightness_rows is None else min(len(x0), suite.straightness_rows)
    xs, vs = flow.path(steps, sharding.leading(x0, count), 0)
    deviations = sharding.map_rows(lambda a, b: straightness.squared_deviations(a, b, flow.duration).T, xs, vs,
                                   count=count, axis=1)
    values = straightness.summary(np.ascontiguousarray(deviations.T))
    if suite.diverged_straightness_as_null:
        return {k: report.finite_or_none(v) for k, v in values.items()}
    return values


def score_models(models: Mapping[str, Model], suite: Suite, samplers: Sequence[solvers.Sampler], *,
                 workdir: epath.Path, eps: float, straightness_steps: int, title: str,
                 tasks: Sequence[fidelity.Task] = (), guidance: float = 1.0) -> dict:
    """Samples and scores every model with every sampler; merges into the workdir's report.

    Entry per model: {'params': count, sampler_key: {metric: value, 'nfe': n}, 'straightness',
    'straightness_norm', and the suite's floor}; each of `tasks` (reconstruction, preservation)
    adds its '<task>_<score>' and '<task>_nfe' to every sampler's cell. Class-conditional models are
    sampled with classifier-free `guidance` (1: none; the NFE counts its calls). Every process samples and
    scores its share of each batch and gets the same merged report; process 0 writes report.json, report.md
    and samples.png. Returns the merged report.
    """
    results, panels = {}, {}
    for name, model in models.items():
        flow = Flow(model, suite.labels, eps, guidance, name)
        entry, shown = {'params': parameter_count(flow.params)}, {}
        applicable = [s for s in samplers if flow.kind.supports(s)]
        if not applicable:
            raise errors.UserError(f"evaluate {name}: none of eval.samplers ({', '.join(s.key for s in samplers)}) "
                                   f'applies to a model of kind {flow.kind.name!r}')
        for sampler in applicable:
            entry[sampler.key], shown[sampler.key] = _score_sampler(flow, sampler, suite, name)
            entry[sampler.key].update(_score_tasks(flow, sampler, suite, tasks, name))
            logging.info('evaluate %s %s: %s', name, sampler.key, entry[sampler.key])
        entry.update(_straightness(flow, suite, straightness_steps))
        entry.update(suite.floor)
        if flow.kind.guidance != 1:  # how it was sampled (the column is absent without guidance)
            entry['guidance'] = flow.kind.guidance
        results[name] = entry
        panels[name] = suite.panels(flow, shown)

    merged = {**report.read_report(workdir), **results}
    if jax.process_index() == 0:
        report.write_report(workdir, merged)
        if panels:
            suite.figure(workdir / 'samples.png', results, panels, title)
            writers.log_png(workdir, 0, 'samples', (workdir / 'samples.png').read_bytes())  # for TensorBoard too
    sharding.barrier('flowjax-evaluate-report')  # the other processes find the files written
    return merged


def evaluate(config: ml_collections.ConfigDict, workdir: str | epath.Path, models: Mapping[str, Model]) -> dict:
    """Scores `models` ({label: (apply, params[, num_classes])}) on `config.data` with `eval.samplers`; with several
    processes each samples and scores its share of the examples (`score_models`)."""
    suite_type = SUITES[config.data.kind]
    suite_type.check(config)
    samplers = parse_samplers(config)
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    suite = suite_type.prepare(config, workdir)
    return score_models(models, suite, samplers, workdir=workdir, eps=config.flow.t_eps,
                        straightness_steps=config.eval.straightness_steps,
                        title=f'{config.method} on {datasets.describe(config)}{_guidance_note(config)}',
                        tasks=fidelity.tasks(config, suite.held_out), guidance=config.eval.get('guidance', 1.0))


def _guidance_note(config: ml_collections.ConfigDict) -> str:
    """The figure title's note of eval.guidance when it is used."""
    scale = config.eval.get('guidance', 1.0)
    return '' if scale == 1 else f', guidance {scale:g}'


def evaluate_models(models: Mapping[str, Model], *, source: np.ndarray, data: np.ndarray, data_b: np.ndarray,
                    samplers: Sequence[str], workdir: str | epath.Path, eps: float = 1e-3,
                    straightness_steps: int = 100, trajectory_count: int = 16, title: str = '',
                    rtol: float = 1e-5, atol: float = 1e-5) -> dict:
    """Toy 2D models scored against given point clouds: `source` starts, held-out `data` and `data_b`."""
    parsed = [solvers.parse_sampler(s, rtol=rtol, atol=atol) for s in samplers]
    suite = toy.PointCloudSuite(source, data, data_b, trajectory_count=trajectory_count)
    return score_models(models, suite, parsed, workdir=epath.Path(workdir), eps=eps,
                        straightness_steps=straightness_steps, title=title)
