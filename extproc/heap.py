"""The garbage collector of a long-running server process.

CPython's cycle collector stops the event loop while it runs. A full (generation 2) collection
walks every container object the process holds: at start-up the modules, grpc and protobuf
(about 48,000 objects), under load also every event a ``sync`` stream holds back (several
objects each; 100 streams hold about 20,000 events). Measured in ``bench/perf.py`` at 100
streams (``bench/README.md``): full collections paused the loop for up to 95 ms, several times a
minute, and made up the p99 of the added latency.

``settle`` freezes what exists once serving begins (``gc.freeze``: start-up objects are never
collected again, so they are never walked again either) and makes full collections rarer (the
third threshold; the younger generations keep Python's settings, so short-lived cycles are
still found quickly). Objects of finished streams are freed by reference counting; only cycles
among long-lived objects wait for a full collection.
"""

from __future__ import annotations

import gc


def settle(full_every: int | None = None) -> None:
    """Collect once, freeze the survivors out of later collections and, with ``full_every``,
    run a full collection once per that many generation-1 collections (Python's default: 10)."""
    gc.collect()
    gc.freeze()
    if full_every is not None:
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, full_every)
