"""Put on PYTHONPATH by a test: vLLM's worker processes take ``RLCD_TEST_SLOW_EXIT`` seconds longer to exit,
as they do on a CPU several times slower than a fast one (their exit takes about 3 s on a fast one)."""

import atexit
import multiprocessing
import os
import time


def _slow_exit():
    if multiprocessing.current_process().name.startswith("VllmWorker"):
        time.sleep(float(os.environ.get("RLCD_TEST_SLOW_EXIT", "0")))


atexit.register(_slow_exit)
