"""Run a runner module of this package in a fresh interpreter, as Lightning's launchers need."""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

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


def destroy_process_group_at_exit() -> None:
    """Destroy this process' default process group, if any, before the interpreter finalizes;
    and, in a runner, end the processes ``ddp_spawn`` starts as forked ones end.

    Lightning's launchers leave the group alive at exit; gloo's worker threads then
    sometimes outlive the interpreter and abort the rank at exit ("terminate called
    without an active exception", SIGABRT) after it did all its work
    (pytorch/pytorch#179291). Called at import by every runner module, so the
    worker processes Lightning starts (re-running or importing it) do it too.

    A spawned process (``ddp_spawn``'s ranks) must not destroy its group at all: on
    torch 2.6 (before pytorch/pytorch#154976) ``~ProcessGroupGloo`` joins its worker
    threads holding the GIL while a worker, freeing its last broadcast's tensors, waits
    for the GIL: a deadlock, now and then, after all the rank's work (in CI rank 1 of
    a finished ``ddp_spawn`` fit never exited; locally gdb showed these two threads,
    the main one releasing the group from a Python frame). So a
    runner's spawned processes end as multiprocessing's forked ones always do, with
    ``os._exit`` and the target's exit status right after the target, running no
    destructor. Only in runner processes (``sys.argv[0]`` is a runner here, as in the
    processes they spawn): a test importing a runner's models is left as it is.
    """
    atexit.register(_destroy_process_group)
    if sys.argv and Path(sys.argv[0]).resolve().parent == SUPPORT:
        _end_spawned_processes_as_forked_ones()


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


def _destroy_process_group() -> None:
    dist = sys.modules.get("torch.distributed")  # not imported: no group to destroy
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
