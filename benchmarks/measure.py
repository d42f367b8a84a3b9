"""What the benchmark scripts share: model FLOPs, the card's matrix rate, timing, memory, tables,
and a summary of a jax.profiler trace. Run the scripts from the repository root."""

import argparse
import collections
import contextlib
import gzip
import json
import math
import os
import pathlib
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / 'experiments'


def experiment(name: str, arg: str | None = None):
    """`get_config(arg)` of experiments/<name>.py: benchmarks time the recipes users run."""
    from flowjax import configs

    return configs.experiment(EXPERIMENTS / f'{name}.py', name, arg)


# ----------------------------------------------------------------------------------------------
# FLOPs: 2 x multiply-adds of every convolution and matrix product in a function's jaxpr (the
# usual model-FLOPs count of MFU; elementwise work is not counted). Training counts 3x forward.
# ----------------------------------------------------------------------------------------------


def _eqn_flops(eqn) -> float:
    name = eqn.primitive.name
    if name == 'dot_general':
        (lhs_contract, _), _ = eqn.params['dimension_numbers']
        lhs = eqn.invars[0].aval.shape
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    if name == 'conv_general_dilated':
        rhs = eqn.invars[1].aval.shape
        spec = eqn.params['dimension_numbers'].rhs_spec  # (out feature, in feature, spatial...)
        per_output = math.prod(rhs[d] for d in spec[1:])  # in features per group x kernel size
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_output
    return 0.0


def _sub_jaxprs(params: dict):
    """The jaxprs inside an equation's params (jit, scan, cond branches, remat, custom_vjp)."""
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        total += _eqn_flops(eqn)
        repeat = eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1
        for sub in _sub_jaxprs(eqn.params):
            total += repeat * _jaxpr_flops(sub)
    return total


def flops(fn: Callable, *args) -> float:
    """Model FLOPs of one call of `fn(*args)` (traced, not run)."""
    return _jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


# ----------------------------------------------------------------------------------------------
# The card.
# ----------------------------------------------------------------------------------------------


def device_name() -> str:
    devices = jax.devices()
    return f'{len(devices)}x {devices[0].device_kind}'


def matmul_tflops(n: int = 8192, dtype=jnp.bfloat16, repeats: int = 20) -> float:
    """The card's measured dense matrix rate (TFLOP/s) on random n x n x n products: the MFU peak."""
    device = jax.devices()[0]
    a, b = (jax.device_put(jax.random.normal(jax.random.key(i), (n, n), dtype), device) for i in (1, 2))
    product = jax.jit(lambda a, b: a @ b)
    seconds = median_seconds(lambda: product(a, b), warmup=10, repeats=repeats)
    return 2.0 * n ** 3 / seconds / 1e12


def median_seconds(fn: Callable[[], object], *, warmup: int, repeats: int) -> float:
    """Median wall time of `fn()` after warm-up, each call waited for on the device."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_gib() -> float | None:
    """Peak device memory of this process (GiB) where the backend reports it (GPU / TPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get('peak_bytes_in_use')
    return None if peak is None else peak / 2 ** 30


# ----------------------------------------------------------------------------------------------
# One process per configuration (clean peak memory, an out-of-memory case fails alone).
# ----------------------------------------------------------------------------------------------


def run_isolated(script: str, case: dict, timeout: float) -> dict:
    """Runs `python <script> --case <json>` and returns the JSON object on its last stdout line.

    With case['processes'] = P > 1 the case runs as P processes of one jax.distributed job on this
    host, process i seeing only its share of the GPUs (as a cluster launch with one process per
    GPU does); the result is process 0's.
    """
    count = case.get('processes', 1)
    cmd = [sys.executable, script, '--case', json.dumps(case)]
    port = _free_port()
    per = max(case.get('devices', 1) // count, 1)
    with tempfile.TemporaryDirectory() as logs, contextlib.ExitStack() as files:
        children = []
        for i in range(count):
            env = dict(os.environ)
            if count > 1:
                gpus = ','.join(map(str, range(i * per, (i + 1) * per)))
                env.update(JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES=str(count),
                           JAX_PROCESS_ID=str(i), CUDA_VISIBLE_DEVICES=gpus)
            out, err = (files.enter_context(open(f'{logs}/{i}.{name}', 'w+')) for name in ('out', 'err'))
            children.append((subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=REPO, env=env), out, err))
        deadline = time.monotonic() + timeout
        try:
            for child, _, _ in children:
                child.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            for child, _, _ in children:
                child.kill()
            children[0][2].seek(0)
            last = (children[0][2].read().strip().splitlines() or ['nothing logged'])[-1]
            return {**case, 'error': f'timed out after {timeout:.0f} s; last logged: {last[:200]}'}
        _, out, err = children[0]
        out.seek(0)
        err.seek(0)
        lines, stderr = out.read().strip().splitlines(), err.read()
        failed = next((c.returncode for c, _, _ in children if c.returncode), 0)
    if failed or not lines:
        errors = [line for line in stderr.splitlines() if re.match(r'[\w.]*(Error|Exception)\b', line)]
        tail = (errors or stderr.strip().splitlines() or [f'a process exited with status {failed}'])[-1]
        return {**case, 'error': tail[:300]}
    return json.loads(lines[-1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def global_array(value, sharding) -> jax.Array:
    """`value` (the same on every process) as one array laid out by `sharding`, also across processes."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def card(script: str, path: str | None = None, timeout: float = 300) -> dict:
    """{'device', 'jax', 'peak_tflops'} measured in a child process (the parent never touches the
    devices, so each case's process has the whole device memory: JAX reserves most of it at start),
    or read from `path` when that file exists (and written there when it does not)."""
    if path and pathlib.Path(path).exists():
        return json.loads(pathlib.Path(path).read_text())
    found = run_isolated(script, {'card': True}, timeout)
    if 'error' in found:
        raise SystemExit(f"benchmark: cannot measure the device: {found['error']}")
    if path:
        pathlib.Path(path).write_text(json.dumps(found))
    return found


def card_case() -> dict:
    import jax

    n, repeats = (8192, 30) if jax.default_backend() != 'cpu' else (1024, 3)
    return {'device': device_name(), 'jax': jax.__version__, 'peak_tflops': matmul_tflops(n, repeats=repeats)}


def arguments(description: str, batch: int) -> argparse.ArgumentParser:
    """The arguments the GPU benchmark scripts share; each adds its own."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--case', help='internal: run one case (JSON) and print its result')
    parser.add_argument('--batch', type=int, nargs='+', default=[batch], help='global batch (see --per_device)')
    parser.add_argument('--per_device', action='store_true', help='--batch is per device (global: batch x devices)')
    parser.add_argument('--dtype', nargs='+', default=['bfloat16'], choices=['bfloat16', 'float32'])
    parser.add_argument('--devices', type=int, nargs='+', default=[1], help='use the first N devices')
    parser.add_argument('--experiment', default='rf_cifar', help='an experiment file with a U-Net on 32x32x3')
    parser.add_argument('--arg', default=None, help="the experiment's :arg")
    parser.add_argument('--profile', action='store_true', help='trace one call per case; kernel time by kind')
    parser.add_argument('--card', default=None, help='a JSON file: the device and its measured matrix rate, '
                        'read if it exists, else measured and written (several runs share one measurement)')
    parser.add_argument('--out', default=None, help='directory for results.jsonl and profiles')
    parser.add_argument('--timeout', type=float, default=900, help='seconds a case may take')
    return parser


def drive(script: str, args: argparse.Namespace, run_case: Callable[[dict], dict], cases: Sequence[dict],
          columns: Sequence[tuple[str, str, str]], title: Callable[[dict, list[dict]], str]) -> None:
    """A benchmark script's main: with `--case`, runs that case here and prints its JSON; otherwise
    measures the card, runs each case in its own process, appends it to <out>/results.jsonl, prints
    its row as it finishes (and its profile), and ends with `title` and the whole table."""
    if args.case:
        case = json.loads(args.case)
        if case.get('processes', 1) > 1:
            from flowjax import distributed

            distributed.initialize()
        print(json.dumps(card_case() if case.get('card') else run_case(case)))
        return
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix='flowjax-bench-'))
    out.mkdir(parents=True, exist_ok=True)
    found = card(script, args.card)
    print(f"{found['device']}: bf16 matrix rate {found['peak_tflops']:.3g} TFLOP/s (measured; the MFU peak)",
          flush=True)
    cases = [{**case, 'processes': p} for case in cases for p in getattr(args, 'processes', [1])
             if case['devices'] % p == 0]
    rows = []
    for i, case in enumerate(cases):
        case = {**case, 'experiment': args.experiment, 'arg': args.arg, 'peak_tflops': found['peak_tflops']}
        case['batch'] *= case['devices'] if args.per_device else 1
        if args.profile:
            case['profile_dir'] = str(out / f'profile-{i}')
        row = run_isolated(script, case, args.timeout)
        rows.append(row)
        with open(out / 'results.jsonl', 'a') as f:
            f.write(json.dumps(row) + '\n')
        if 'profile' in row:
            print(f'case {i}:\n' + format_profile(row['profile']), flush=True)
        print(table([row], columns).splitlines()[-1], flush=True)
    print('\n' + title(found, rows))
    print(table(rows, columns))


def table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table: columns are (key, header, format)."""
    out = ['| ' + ' | '.join(h for _, h, _ in columns) + ' |', '|' + '---|' * len(columns)]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append('-' if value is None else format(value, fmt) if fmt else str(value))
        if 'error' in row:
            cells[-1] = f"error: {row['error']}"
        out.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(out)


# ----------------------------------------------------------------------------------------------
# Profiles: device kernel time by kind, from jax.profiler's Perfetto trace.
# ----------------------------------------------------------------------------------------------

_KINDS = (  # (kind, pattern on the lower-cased kernel name), first match wins
    ('collective', r'nccl|all_reduce|allreduce|all-reduce'),
    ('conv / matmul', r'gemm|xmma|cutlass|cudnn|conv|wgmma|hmma|fprop|dgrad|wgrad|nvjet|sm90_|sm80_|triton_gemm'),
    ('copy / memset', r'memcpy|memset|copy'),
    ('reduction fusion', r'reduce'),
    ('elementwise fusion', r'fusion|loop_|triton'),
)


def kernel_kind(name: str) -> str:
    lower = name.lower()
    for kind, pattern in _KINDS:
        if re.search(pattern, lower):
            return kind
    return 'other'


def trace_file(log_dir: str | pathlib.Path) -> pathlib.Path | None:
    found = sorted(pathlib.Path(log_dir).rglob('perfetto_trace.json.gz'))
    return found[-1] if found else None


def summarize_trace(path: str | pathlib.Path, calls: int) -> dict:
    """Device kernel time per call of the profiled function, by kind, and the top kernels.

    Kernels are the events on the device's stream lines; `busy` is their union over time (streams
    overlap), `span` the first kernel start to the last kernel end: span - busy is device idle time.
    """
    with gzip.open(path, 'rt') as f:
        trace = json.load(f)
    events = trace['traceEvents'] if isinstance(trace, dict) else trace
    processes, threads = {}, {}
    for e in events:
        if e.get('ph') == 'M' and e.get('name') == 'process_name':
            processes[e['pid']] = e['args'].get('name', '')
        if e.get('ph') == 'M' and e.get('name') == 'thread_name':
            threads[(e['pid'], e['tid'])] = e['args'].get('name', '')
    device_pids = {pid for pid, name in processes.items() if re.search(r'/device:(GPU|TPU)', name)}
    on_device = [e for e in events if e.get('ph') == 'X' and e.get('pid') in device_pids]
    line = lambda e: threads.get((e['pid'], e.get('tid')), '')
    kernels = [e for e in on_device if re.search(r'stream', line(e), re.I)]
    if not kernels:  # no stream lines: every device line but the derived (module, op, step) ones
        kernels = [e for e in on_device if not re.search(r'XLA Modules|XLA Ops|Framework|Steps|Source', line(e))]
    by_kind, by_name = collections.Counter(), collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_kind[kernel_kind(e['name'])] += e['dur']
        by_name[e['name']][0] += e['dur']
        by_name[e['name']][1] += 1
    intervals = sorted((e['ts'], e['ts'] + e['dur']) for e in kernels)
    busy, end = 0.0, -math.inf
    for lo, hi in intervals:
        if hi > end:
            busy += hi - max(lo, end)
            end = hi
    span = (intervals[-1][1] - intervals[0][0]) if intervals else 0.0
    ms = lambda us: us / 1e3 / calls
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:12]
    return {'ms_per_call': {'span': ms(span), 'busy': ms(busy), **{k: ms(v) for k, v in by_kind.most_common()}},
            'top_kernels': [(name[:90], ms(total), count / calls) for name, (total, count) in top],
            'kernels_per_call': len(kernels) / calls}


def profile(fn: Callable[[], object], log_dir: str | pathlib.Path, calls: int = 3) -> dict | None:
    """Traces `calls` calls of `fn` (already warm) and summarizes the device kernels."""
    jax.block_until_ready(fn())
    with jax.profiler.trace(str(log_dir), create_perfetto_trace=True):
        for _ in range(calls):
            out = fn()
        jax.block_until_ready(out)
    path = trace_file(log_dir)
    return None if path is None else {'trace': str(path), **summarize_trace(path, calls)}


def format_profile(summary: dict) -> str:
    lines = ['device time per call (ms): ' + ', '.join(f'{k} {v:.2f}' for k, v in summary['ms_per_call'].items()),
             f"kernels per call: {summary['kernels_per_call']:.0f}; top kernels (ms per call, launches per call):"]
    lines += [f'  {total:8.2f}  {count:5.0f}  {name}' for name, total, count in summary['top_kernels']]
    return '\n'.join(lines)


def host_array(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
