"""The garbage collector of a long-running server process.

CPython's cycle collector stops the event loop while it runs. A full (generation 2) collection
walks every container object the process holds: at start-up the modules, grpc and protobuf
(about 48,000 objects), under load also every event a ``sync`` stream holds back (several
objects each; 100 streams hold about 20,000 events). Measured in ``bench/perf.py`` at 100
streams (``bench/README.md``): full collections paused the loop for up to 95 ms, several times a
minute, and made up the p99 of the added latency.

``settle`` freezes what exists once serving begins (``gc.freeze``: start-up objects are never
collected again, so they are never walked again either), makes full collections rarer (the
third threshold) and, with ``young``, young collections too. Objects of finished streams are
freed by reference counting; only cycles wait for a collection.

Young collections: Python starts one whenever 700 more container objects were created than
freed. A ``sync`` stream holds every event until its window is checked, four objects plus a tuple
each, so under load nearly every young collection walks objects that are still held, moves
them to generation 1, and every tenth walks generation 1 again. At 300 streams in one process
that was about 1,000 young and 90 generation-1 collections in a 17-second cell, 1.6 s of
paused loop (9% of the sidecar's CPU; ``bench/README.md``). With a threshold of 10,000 most
held events are released, and freed, before a collection sees them: 25 young collections of
about 8 ms and 6 of generation 1 of about 45 ms in the same cell. Generation 1 is collected
every ``MIDDLE_EVERY`` young collections rather than every tenth, so that it never holds
more than a few young collections' survivors and its pause stays short.
"""

from __future__ import annotations

import gc

#: With ``young``: a generation-1 collection once per this many young ones (Python: 10).
MIDDLE_EVERY = 3


def settle(full_every: int | None = None, *, young: int | None = None) -> None:
    """Collect once and freeze the survivors out of later collections. With ``full_every``,
    a full collection runs once per that many generation-1 collections (Python's default: 10);
    with ``young``, a young collection once that many more containers were created than freed
    (Python's default: 700), and generation 1 once per ``MIDDLE_EVERY`` of them."""
    gc.collect()
    gc.freeze()
    threshold, middle, full = gc.get_threshold()
    if young is not None:
        threshold, middle = young, MIDDLE_EVERY
    if full_every is not None:
        full = full_every
    gc.set_threshold(threshold, middle, full)
