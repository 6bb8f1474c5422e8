"""A small closed-loop HTTP load generator: N keep-alive connections for T seconds.

    python benchmarks/http_load.py PORT PATH CONCURRENCY SECONDS

Runs in its own process with gevent (one OS thread, so the server under test keeps the
other core), each connection sending the next request as soon as the last one answered.
Prints one JSON line: requests, errors, requests/s, mean, p50 and p99 latency in ms.
"""

from gevent import monkey

monkey.patch_all()

import http.client  # noqa: E402 - after patching, as gevent requires
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402


def main() -> None:
    port, path, concurrency, seconds = (
        int(sys.argv[1]),
        sys.argv[2],
        int(sys.argv[3]),
        float(sys.argv[4]),
    )
    latencies: list[float] = []
    errors = [0]
    deadline = time.perf_counter() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    conn.request("GET", path)
                    resp = conn.getresponse()
                    resp.read()
                    ok = resp.status == 200
                except (OSError, http.client.HTTPException):
                    ok = False
                    conn.close()
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[0] += 1
        finally:
            conn.close()

    began = time.perf_counter()
    gevent.joinall([gevent.spawn(client) for _ in range(concurrency)])
    elapsed = time.perf_counter() - began
    latencies.sort()
    n = len(latencies)
    print(
        json.dumps(
            {
                "requests": n,
                "errors": errors[0],
                "rps": n / elapsed,
                "mean_ms": sum(latencies) / n * 1000 if n else None,
                "p50_ms": latencies[n // 2] * 1000 if n else None,
                "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else None,
            }
        )
    )


if __name__ == "__main__":
    main()
