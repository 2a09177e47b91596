"""Wall-clock limits of the tests' subprocesses: only a hung process should trip one, on any machine.

A limit is generous and grows with the load (other jobs sharing the cores slow every subprocess down), so a
slow or busy machine never fails a test that would pass on an idle one."""
import os


def hang_limit(seconds: float = 600) -> int:
    """`seconds` scaled by the load per core (at least 1x)."""
    return int(seconds * max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1)))
