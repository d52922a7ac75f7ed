"""Keep the garbage collector's full collections short in the media processes.

A gateway or replica process holds a large, long-lived heap once it has started (torch,
aiortc, Ray, avatars): a full (generation 2) collection walks all of it, long enough to
stall every session's senders past their 160 ms video queue (measured: benchmarks/README.md,
section "Figures behind settings in the code"). `freeze_startup_heap()` moves everything
allocated so far into the collector's permanent generation (`gc.freeze`), so later
collections only walk what sessions allocate.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect once, then freeze the survivors (call when start-up is done); their count."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("froze %d start-up objects out of the garbage collector's full collections", frozen)
    return frozen
