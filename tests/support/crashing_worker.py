"""A real `toposerve worker` whose model runtime kills the process on a poison row.

What a crash in a native library looks like to the broker: the process is gone
(``os._exit``, no cleanup, no ack), and every message it held goes back to the
queue marked redelivered. Run as ``python -m tests.support.crashing_worker worker ...``.
"""

from __future__ import annotations

import os

import numpy as np

from toposerve.consumers.batching import MicroBatcher
from toposerve.deploy.cli import main

POISON = 42.0  # a request row whose first value is this kills the process
CRASH_EXIT_CODE = 86

_real_init = MicroBatcher.__init__


def _crashing_init(self: MicroBatcher, run_batch, *args, **kwargs) -> None:
    def run(model: str, features: np.ndarray):
        if bool((features[:, 0] == POISON).any()):
            os._exit(CRASH_EXIT_CODE)
        return run_batch(model, features)

    _real_init(self, run, *args, **kwargs)


if __name__ == "__main__":
    MicroBatcher.__init__ = _crashing_init  # type: ignore[method-assign]
    main()
