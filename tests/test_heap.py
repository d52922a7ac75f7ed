"""freeze_startup_heap: start-up objects leave the collector's full collections."""

from __future__ import annotations

import gc

from ray_lipsync.heap import freeze_startup_heap


def test_start_up_objects_are_frozen_and_new_ones_are_still_collected() -> None:
    before = [object() for _ in range(3)]  # a start-up structure (a tracked container)
    try:
        assert freeze_startup_heap() >= 1
        tracked = {id(o) for o in gc.get_objects()}
        assert id(before) not in tracked  # a full collection no longer walks it
        cycle: list = []
        cycle.append(cycle)  # garbage made after start-up is still found
        ref = id(cycle)
        del cycle
        assert gc.collect() >= 1 and ref not in {id(o) for o in gc.get_objects()}
    finally:
        gc.unfreeze()
