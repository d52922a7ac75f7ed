"""How long a burst of small torch ops takes while another Python thread of the same process
keeps the interpreter busy (the GIL "convoy"), at several `sys.setswitchinterval` values.

Why it matters: every torch op called from Python releases the GIL around its dispatch. A
thread issuing many small ops (an eager UNet forward on a GPU is thousands of kernel launches)
gives the GIL away at each one; if another thread wants it, getting it back can take up to the
switch interval (5 ms by default). The GPU check (benchmarks/README.md, "gpu_check") saw the
in-process MuseTalk pipeline render 3-13 frames/s on an H200 whose UNet alone renders 16-204
frames/s in its own benchmark: this script measures the mechanism on any CPU.

    python benchmarks/gil_convoy.py [--ops 2000] [--repeats 5] --json benchmarks/results/gil_convoy.json
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from output import git_commit, write_json  # noqa: E402

log = logging.getLogger("gil_convoy")
INTERVALS_S = (0.005, 0.001, 0.0002, 0.00005)  # 0.005 = CPython's default


def burst_ms(x: torch.Tensor, ops: int) -> float:
    """Wall time of `ops` in-place adds on a tiny tensor (each op: one GIL release)."""
    started = time.perf_counter()
    for _ in range(ops):
        x.add_(1)
    return (time.perf_counter() - started) * 1000


def beside_busy_thread(ops: int, repeats: int) -> list[float]:
    """`burst_ms` `repeats` times while a second thread runs pure Python without pause."""
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            sum(range(1000))

    thread = threading.Thread(target=busy, daemon=True)
    thread.start()
    try:
        x = torch.zeros(16)
        return [burst_ms(x, ops) for _ in range(repeats)]
    finally:
        stop.set()
        thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=2000, help="small ops per burst")
    parser.add_argument("--repeats", type=int, default=5, help="bursts per setting")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    default_interval = sys.getswitchinterval()
    alone = [burst_ms(torch.zeros(16), args.ops) for _ in range(args.repeats)]
    rows = []
    try:
        for interval in INTERVALS_S:
            sys.setswitchinterval(interval)
            times = beside_busy_thread(args.ops, args.repeats)
            rows.append({"switch_interval_ms": interval * 1000, "burst_ms": [round(t, 1) for t in times],
                         "median_ms": round(statistics.median(times), 1), "worst_ms": round(max(times), 1)})
            log.info("switch interval %.2f ms: burst of %d ops median %.1f ms, worst %.1f ms",
                     interval * 1000, args.ops, rows[-1]["median_ms"], rows[-1]["worst_ms"])
    finally:
        sys.setswitchinterval(default_interval)
    result = {
        "benchmark": "gil_convoy",
        "commit": git_commit(),
        "ops_per_burst": args.ops,
        "alone_ms": {"median": round(statistics.median(alone), 1), "worst": round(max(alone), 1)},
        "beside_busy_thread": rows,
    }
    log.info("alone: median %.1f ms", result["alone_ms"]["median"])
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
