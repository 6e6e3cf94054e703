import sys
import time

STARTED = time.perf_counter()  # before any import of ours: the CLI reports time from here

from .cli import main  # noqa: E402

sys.exit(main(started=STARTED))
