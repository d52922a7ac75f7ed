"""Failover: speech lost when each process of the pipeline dies, on a real multi-node cluster.

Runs tests/test_cluster_faults.py (a `ray start` head + two workers that declare one GPU each,
the Serve app configured through Serve args; each pipeline process killed mid-speech with
SIGKILL by PID, then a gateway and a whole worker node) and collects the figures those tests
measure: speech frames the session counted as dropped after each kill (x 40 ms = the gap),
how soon a new session succeeds, how soon a dead gateway's slots are free.

    python benchmarks/failover.py [--json benchmarks/results/failover.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "failover.json")
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as tmp:
        figures_path = Path(tmp.name)
    env = {**os.environ, "LIPSYNC_FAILOVER_JSON": str(figures_path)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_cluster_faults.py"], cwd=ROOT, env=env)
    cases = [json.loads(line) for line in figures_path.read_text().splitlines() if line.strip()]
    figures_path.unlink()
    result = {"benchmark": "failover", "tests_passed": run.returncode == 0, "cases": cases}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for case in cases:
        sys.stdout.write(f"{case['case']:32s} {', '.join(f'{k}={v}' for k, v in case.items() if k not in ('case', 'drops'))}\n")
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
