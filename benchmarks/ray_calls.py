"""CPU of one dispatch hop between Ray processes, with and without a round's crops.

The shape of the replica -> compositor hop: this process calls an async actor (`Middle`, as
the gateway calls a replica), which makes `--crops` arrays and calls a plain actor (`Leaf`, as
the replica calls the compositor) with them; the leaf answers small patches. Rounds are
paced at `--rate` a second (17-19 at random talker phases with 6 sessions). Ray starts with
the pipeline's own settings (`actors/runtime.py`: crops travel inline). Reported per round:
CPU milliseconds of each of the three processes (psutil), for crops of `--sizes` pixels
square, median of `--runs` runs interleaved.

    .venv/bin/python benchmarks/ray_calls.py --json benchmarks/results/ray_calls.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import ray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors.runtime import init_ray  # noqa: E402


@ray.remote
class Leaf:
    def patch_many(self, frames: list[int], crops: list[np.ndarray]) -> list[np.ndarray]:
        return [np.ascontiguousarray(c[:40, :60]) for c in crops]

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class Middle:
    def __init__(self, leaf: "ray.actor.ActorHandle") -> None:
        self.leaf = leaf

    async def round(self, crops: int, size: int) -> list[np.ndarray]:
        batch = [np.full((size, size, 3), 7, np.uint8) for _ in range(crops)]
        return await self.leaf.patch_many.remote(list(range(crops)), batch)

    def pid(self) -> int:
        return os.getpid()


async def measure(middle: "ray.actor.ActorHandle", procs: list[psutil.Process], crops: int, size: int,
                  rounds: int, rate: float) -> list[float]:
    """CPU ms per round of each process in `procs` over `rounds` paced rounds."""
    for _ in range(20):
        await middle.round.remote(crops, size)
    before, start = [p.cpu_times() for p in procs], time.monotonic()
    for i in range(rounds):
        await middle.round.remote(crops, size)
        await asyncio.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
    after = [p.cpu_times() for p in procs]
    return [1000 * ((b.user + b.system) - (a.user + a.system)) / rounds for a, b in zip(before, after)]


async def run(args: argparse.Namespace) -> dict:
    leaf = Leaf.remote()
    middle = Middle.remote(leaf)
    pids = await asyncio.gather(leaf.pid.remote(), middle.pid.remote())
    procs = [psutil.Process(pid) for pid in pids] + [psutil.Process()]
    samples: dict[int, list[list[float]]] = {size: [] for size in args.sizes}
    for _ in range(args.runs):
        for size in args.sizes:
            samples[size].append(await measure(middle, procs, args.crops, size, args.rounds, args.rate))
    names = ("leaf (compositor)", "middle (replica)", "caller (gateway)")
    return {str(size): {name: {"median_ms": round(statistics.median(r[i] for r in runs), 2),
                               "runs_ms": [round(r[i], 2) for r in runs]} for i, name in enumerate(names)}
            for size, runs in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=8, help="crops per round")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[256, 16])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--rate", type=float, default=18.0, help="rounds a second")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    init_ray(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    try:
        result = asyncio.run(run(args))
    finally:
        ray.shutdown()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"commit": commit, "crops": args.crops, "rounds": args.rounds, "rate": args.rate,
           "ms_cpu_per_round": result}
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
