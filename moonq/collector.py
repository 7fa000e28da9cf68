"""Python's cyclic garbage collector, set for a server process that holds thousands of jobs'
objects at once (the API, the worker, the fake upstream).

CPython's defaults (700, 10, 10 up to 3.12; a young threshold of 2,000 from 3.13) collect the
young generation every 700 net allocations and the whole heap whenever what survived two young
collections has grown by a quarter. A process
holding 4,000 streams keeps millions of objects alive for the streams' ~20 s, so nearly every
stream's objects survive into the old generation, and each full collection walks all of them:
measured with 4,000 slow streams on two cores, the collector took 44 % of the API's CPU and
48 % of the worker's, 0.4 s a full collection, each one a pause for every stream.

Collecting the young generation every 10,000 allocations instead gives a stream's short-lived
objects the time to die young (fewer reach the old generation, which is then collected about
a tenth as often), and freezing what the process built to start keeps it out of every later
collection. Same run: 4.2 → 2.7 ms of API CPU and 6.2 → 3.0 ms of worker CPU a stream, the
same peak RSS. Cycles made of young objects still die at the next young collection
(milliseconds later); older ones at the next full collection, as before.

Python 3.14's incremental collector reads only the young threshold (and ignores the third);
`tune` sets it and freezes there too, but its gain was measured on 3.11 and 3.12.
"""

from __future__ import annotations

import gc

YOUNG = 10_000  # net allocations between two collections of the youngest generation


def tune() -> None:
    """Once, at a server process's start, after it has imported and built what it starts
    with: collect, freeze what survives (out of every later collection: a frozen object in a
    cycle is never freed, so never call this once the process serves), and collect the young
    generation less often. The two older generations keep CPython's thresholds."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG, middle, old)
