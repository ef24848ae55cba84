"""Per-request Python cost of ``EngineRuntime`` (no sockets; publish is a no-op).

Not a test (timings belong in benchmarks): run it by hand::

    /usr/bin/python3 tests/python/bench_runtime.py

For reference it also times the part every engine pays regardless of the runtime: unpacking
the apply payload and serializing the result with ``ipyparallel.serialize``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

import ipyparallel as ipp  # noqa: E402
import numpy as np  # noqa: E402
from ipyparallel.serialize import pack_apply_message, serialize_object, unpack_apply_message  # noqa: E402

from pxfabric.engine import EngineRuntime  # noqa: E402


@ipp.interactive
def inc(x):
    return x + 1


def timeit(fn, n: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean time of ``n`` calls, in microseconds."""
    fn()
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(samples)


def main() -> None:
    rt = EngineRuntime(0, "bench-uuid", lambda *a: None,
                       profile_dir=tempfile.mkdtemp(prefix="pxf-bench-"), install_streams=False)
    header = {"msg_id": "0123abcd-4567_1_1", "msg_type": "apply_request", "session": "s",
              "username": "u", "date": "2026-01-01T00:00:00Z", "version": "5.3"}
    small = pack_apply_message(inc, (1,), {})
    big = pack_apply_message(ipp.interactive(lambda a: a), (np.zeros(1 << 17),), {})
    ns = {}

    def baseline():
        f, args, kwargs = unpack_apply_message(small, ns, copy=False)
        serialize_object(f(*args, **kwargs))

    results = {
        "apply tiny: unpack+call+serialize only (ipyparallel.serialize)": timeit(baseline, 2000),
    }
    rt.install_streams()
    try:
        results["apply tiny (handle_shell)"] = timeit(
            lambda: rt.handle_shell("apply_request", header, {}, {}, small), 2000)
        results["apply 1 MiB numpy in and out"] = timeit(
            lambda: rt.handle_shell("apply_request", header, {}, {}, big), 500)
        eh = dict(header, msg_type="execute_request")
        for silent in (True, False):
            content = {"code": "a = 1", "silent": silent, "user_expressions": {}}
            results[f"execute 'a = 1' silent={silent}"] = timeit(
                lambda: rt.handle_shell("execute_request", eh, {}, content, []), 300)
    finally:
        rt.restore_streams()
        rt.close()
    for name, us in results.items():
        print(f"{us:9.1f} us  {name}")


if __name__ == "__main__":
    main()
