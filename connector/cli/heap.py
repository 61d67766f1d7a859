"""What ``up`` does to its heap once it has started: everything alive then is frozen out of
the garbage collector's full passes.

A full (generation 2) collection walks every object the collector tracks, and the event
loop stands still meanwhile. Once ``up`` has started, ~71,000 objects are tracked (modules,
classes, pydantic schemas, the API's routes), nearly all of which live as long as the
process. With 1,000 replicas running a full pass took 54-94 ms, the longest single stall of
a mass scale; with the start-up heap frozen, 25-36 ms. Garbage made during start-up is
collected first, so none of it is frozen with the rest.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    gc.collect()
    gc.freeze()
