"""`python -m flowjax.main ARGS` many times without paying for Python's imports each time.

A server process (started with the environment a command line would have) imports flowjax's
modules once, touching no device; each request then forks a child that runs flowjax/main.py as
`__main__` (a fresh module, its flags defined anew) with its own argv, working directory, stdout and
stderr files, and reports the child's exit status. The child is a command-line run in everything
but the imports it inherits.

    with cli_server.Server(env) as server:
        status, stdout, stderr = server.run(['--config=...', '--workdir=...'], cwd=ROOT)

Run as a script, this module is the server: one JSON request per stdin line, one reply per stdout line.
"""

import json
import os
import subprocess
import sys
import tempfile
import traceback


def _child(request: dict) -> int:
    """Runs flowjax.main as `python -m flowjax.main` would, in this (forked) process; its exit status."""
    import runpy

    os.chdir(request['cwd'])
    sys.path[0] = request['cwd']  # as `python -m` puts the working directory first
    for fd, path in ((1, request['stdout']), (2, request['stderr'])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.argv = [os.path.join(os.path.dirname(os.path.abspath(__import__('flowjax').__file__)), 'main.py'),
                *request['argv']]
    try:
        runpy.run_module('flowjax.main', run_name='__main__', alter_sys=True)
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - an uncaught exception, as Python would report it
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def serve() -> None:
    import flowjax.evaluate  # noqa: F401 - everything main imports, and what the methods import on first use
    import flowjax.methods.table  # noqa: F401
    import flowjax.pipeline  # noqa: F401
    from jax._src import xla_bridge

    assert not xla_bridge._backends, 'importing flowjax started a JAX backend; forked runs would share it'
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os._exit(_child(request))
        _, status = os.waitpid(pid, 0)
        print(json.dumps({'status': os.waitstatus_to_exitcode(status)}), flush=True)


class Server:
    """The server process, started with `env`; `run(argv, cwd) -> (status, stdout, stderr)`."""

    def __init__(self, env: dict):
        self._process = subprocess.Popen([sys.executable, __file__], env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
        self._dir = tempfile.TemporaryDirectory(prefix='flowjax-cli-')

    def run(self, argv: list[str], cwd) -> tuple[int, str, str]:
        out, err = os.path.join(self._dir.name, 'stdout'), os.path.join(self._dir.name, 'stderr')
        request = {'argv': list(argv), 'cwd': str(cwd), 'stdout': out, 'stderr': err}
        self._process.stdin.write(json.dumps(request) + '\n')
        self._process.stdin.flush()
        reply = self._process.stdout.readline()
        if not reply:
            raise RuntimeError('the flowjax CLI server stopped')
        with open(out) as f_out, open(err) as f_err:
            return json.loads(reply)['status'], f_out.read(), f_err.read()

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait(timeout=60)
        self._dir.cleanup()

    def __enter__(self) -> 'Server':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == '__main__':
    serve()
