"""Shared test models, multi-process runners and measurements (not part of the package)."""

import faulthandler
import os
import signal
import sys
from pathlib import Path

#: This folder: test models are also ``lightning-meta`` CLI targets by file path.
SUPPORT = Path(__file__).resolve().parent

#: Set by `support.processes.run_module` for the processes it starts. Every process of a
#: run imports this package (Lightning's launchers re-run or re-import the runner), so a
#: run that hangs can be asked for every thread's stack with SIGUSR1 before it is killed:
#: a hang in CI is then a traceback, not only a timeout.
STACKS_ON_SIGUSR1 = "LIGHTNING_META_TEST_STACKS_ON_SIGUSR1"

if os.environ.get(STACKS_ON_SIGUSR1) and hasattr(signal, "SIGUSR1"):
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
