"""Run every benchmark: ``.venv/bin/python -m bench`` (or ``make bench``).

Each one runs in a process of its own (each configures Django for its own
Redis), starts its own servers on loopback and prints ratios measured side
by side in one run.
"""

import subprocess
import sys

BENCHMARKS = ("rate_limiter", "pool", "breaker", "overload")


def main(names: list[str]) -> int:
    failed = 0
    for name in names or BENCHMARKS:
        print(f"\n=== bench.{name}", flush=True)
        failed += subprocess.call([sys.executable, "-m", f"bench.{name}"]) != 0
    return failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
