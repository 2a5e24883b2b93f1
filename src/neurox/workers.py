"""Process pools for work split by run or by participant (prepare, synth, connectivity).

Processes are spawned, not forked: the parent may hold threads (prefetch, compression) that a fork would
break. Each worker runs its linear algebra on one thread. NumPy's BLAS otherwise starts a thread per core
in every worker, and N workers on N cores then run N x N threads: on 2 cores, `prepare --workers 2
--confounds simple` took 16.0 s against 9.3 s with one BLAS thread a worker (docs/performance.md).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor


def process_pool(workers: int, initializer=None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """``workers`` spawned processes, one BLAS thread each, ``initializer(*initargs)`` run once in each."""
    return _Pool(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start,
                 initargs=(initializer, initargs))


class _Pool(ProcessPoolExecutor):
    def __exit__(self, exc_type, exc, traceback):
        # on an error or Ctrl-C the queued work is dropped, and only what is running finishes (the standard
        # executor would first run every queued job: minutes of a cohort after the user asked to stop)
        self.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False


ONE_THREAD = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def _start(initializer, initargs: tuple) -> None:
    import os
    import signal

    from threadpoolctl import threadpool_limits

    # Ctrl-C reaches every process of the terminal's group: the parent alone stops the work (one line, the
    # pool shut down), not every worker with a traceback of its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(dict.fromkeys(ONE_THREAD, "1"))  # the libraries the worker loads later (torch's OpenMP)
    threadpool_limits(1)  # the ones it has loaded already, for the life of the worker
    if initializer is not None:
        initializer(*initargs)
