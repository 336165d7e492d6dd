"""Run a runner module of this package in a fresh interpreter, as Lightning's launchers need."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from support import STACKS_ON_SIGUSR1, SUPPORT


def run_module(
    module: str, *args: str, cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m support.<module> ARGS`` in ``cwd`` with one thread per process.

    ``tests/`` goes on ``PYTHONPATH`` so the runner, and the worker processes
    Lightning starts by re-running it, import ``support`` like the tests do. The run
    is a session of its own: past ``timeout`` every process in it prints each
    thread's stack (SIGUSR1, see `support.STACKS_ON_SIGUSR1`), is killed, and the
    test fails with those stacks; no process of the run outlives it.
    """
    tests = str(SUPPORT.parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": path,
        STACKS_ON_SIGUSR1: "1",
    }
    argv = [sys.executable, "-m", f"support.{module}", *args]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_session(proc.pid, signal.SIGUSR1)
        try:  # the dumps are written at once; the hung processes stay hung
            stdout, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            _signal_session(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        raise AssertionError(
            f"{' '.join(argv[1:])} did not finish in {timeout:.0f} s; every thread of every"
            f" process of the run, when it was stopped:\n{stderr[-20000:]}\n{stdout[-2000:]}"
        ) from None
    finally:
        _signal_session(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def _signal_session(pid: int, sig: signal.Signals) -> None:
    # ProcessLookupError: every process of the session has exited.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def run_cli(
    *argv: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m lightning_meta ARGV`` in ``cwd``, a fresh process as a user's shell
    starts it (nothing imported before the target; no traceback requested); ``env``: set
    on top of this process's environment (a ``PYTHONPATH`` goes after the package's)."""
    import lightning_meta

    env = {**os.environ, **(env or {})}
    src = str(Path(lightning_meta.__file__).parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    env.pop("LIGHTNING_META_TRACEBACK", None)
    return subprocess.run(
        [sys.executable, "-m", "lightning_meta", *argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
        check=False,
    )


def end_without_finalizing() -> None:
    """In a runner, end the processes ``multiprocessing`` spawns (``ddp_spawn``'s ranks,
    ``torch.multiprocessing.spawn``'s) as forked ones end: ``os._exit`` with the target's
    exit status right after the target. Called at import by every runner module, so the
    processes that import it again (spawned ones) do it too; the runner's own process
    ends the same way through :func:`run_main`.

    No rank may destroy its process group, nor let the interpreter release it at exit:
    - on torch 2.6 (before pytorch/pytorch#154976) ``~ProcessGroupGloo`` joins its worker
      threads holding the GIL while a worker, freeing its last collective's tensors, waits
      for the GIL: a deadlock, now and then, after all the rank's work (in CI rank 1 of a
      finished ``ddp_spawn`` fit never exited; locally gdb showed these two threads, the
      main one releasing the group from a Python frame);
    - left alive at exit, gloo's worker threads sometimes outlive the interpreter and
      abort the rank (SIGABRT, "terminate called without an active exception") after it
      did all its work (pytorch/pytorch#179291).
    ``os._exit`` runs no destructor and ends every thread. Only in runner processes
    (``sys.argv[0]`` is a runner here, as in the processes they spawn): a test importing
    a runner's models is left as it is.
    """
    if sys.argv and Path(sys.argv[0]).resolve().parent == SUPPORT:
        _end_spawned_processes_as_forked_ones()


def run_main(main: Callable[[], object]) -> NoReturn:
    """Run a runner's ``main`` and end the process with ``os._exit`` and the status the
    interpreter would give (see :func:`end_without_finalizing`): 0, ``sys.exit``'s code,
    or 1 after printing the traceback of an exception."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = _exit_status(e.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # closed, or None
            stream.flush()
    os._exit(code)


def _exit_status(code: object) -> int:
    # As the interpreter reads SystemExit: None is 0, an int is itself, anything else is
    # printed and is 1.
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _end_spawned_processes_as_forked_ones() -> None:
    from multiprocessing import process

    bootstrap = process.BaseProcess._bootstrap
    if getattr(bootstrap, "ends_with_os_exit", False):
        return

    def _bootstrap(self: Any, parent_sentinel: Any = None) -> int:
        code: int = bootstrap(self, parent_sentinel)  # runs the target, flushes stdio
        os._exit(code)

    _bootstrap.ends_with_os_exit = True  # type: ignore[attr-defined]
    process.BaseProcess._bootstrap = _bootstrap  # type: ignore[method-assign]


def launch_ranks(module: str, world: int, *args: str) -> int:
    """Run ``python -m module world *args`` in ``world`` processes; the worst exit status."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
        }
        procs.append(subprocess.Popen([sys.executable, "-m", module, str(world), *args], env=env))
    return max(p.wait() for p in procs)
