"""``python -m alignkit ...`` is the ``alignkit`` command (also what ``torchrun -m alignkit`` runs)."""
import logging
import os
import sys

from alignkit.cli import main

code = main() or 0
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A rank launched by torchrun: its results are on disk and its process group is destroyed. Skip the
    # interpreter's teardown, where a c10d thread was seen to abort a finished rank under load
    # ("terminate called without an active exception"), which torchrun reports as the job failing.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
