"""Run a runner module of this package in a fresh interpreter, as Lightning's launchers need."""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
from pathlib import Path

from support import SUPPORT


def run_module(
    module: str, *args: str, cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m support.<module> ARGS`` in ``cwd`` with one thread per process.

    ``tests/`` goes on ``PYTHONPATH`` so the runner, and the worker processes
    Lightning starts by re-running it, import ``support`` like the tests do.
    """
    tests = str(SUPPORT.parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", f"support.{module}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        check=False,
    )


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
    """Destroy this process' default process group, if any, before the interpreter finalizes.

    Lightning's launchers leave it alive at exit; gloo's worker threads then
    sometimes outlive the interpreter and abort the rank at exit ("terminate
    called without an active exception", SIGABRT) after it did all its work
    (pytorch/pytorch#179291). Called at import by every runner module, so
    the worker processes Lightning starts (re-running or importing it) do
    it too.
    """
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
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
