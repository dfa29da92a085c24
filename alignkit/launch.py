"""``torchrun`` with the exit code of a stopped run: ``python -m alignkit.launch`` takes torchrun's
arguments (``--nproc_per_node 2 -m alignkit train CONFIG ...``).

A run stopped by SIGINT/SIGTERM saves a checkpoint and exits with 128 + the signal number, so a
scheduler can requeue it. torchrun itself reports 1 for that: a signal to the launcher escapes it
as torch's ``SignalException`` (after it has passed the signal on to the workers and waited for
them), and workers that stopped on a signal are a ``ChildFailedError``. Here both become
128 + the signal number; any other failure stays 1.
"""
from __future__ import annotations

import sys
from typing import Sequence

from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

STOPPED = (130, 143)  # a worker that saved and stopped on SIGINT / SIGTERM (alignkit.core.errors.Interrupted)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        torchrun(list(argv) if argv is not None else None)
    except SignalException as err:
        return 128 + int(err.sigval)
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        return codes.pop() if len(codes) == 1 and codes <= set(STOPPED) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
