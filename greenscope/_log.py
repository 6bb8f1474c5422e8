"""Rate-limited WARNINGs: the first few of a minute in full, then one summary a minute.

A leak in production (a code path that never calls ``remove()``) makes one orphan per
request: logged one by one it floods the log and hides everything else. greenscope's
counters stay exact; only the log lines are limited.

Thread/greenlet safety: :meth:`RateLimited.warn` may run in any greenlet or thread, never
in a hub or GC callback (it logs). Its state is updated under a real lock held only for
a few dict operations, never while logging.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable

from greenscope import _cleanup

__all__ = ["RateLimited"]

logger = logging.getLogger("greenscope")

_WINDOW = 60.0
# Greenlet names and addresses vary per greenlet ("Greenlet-3", "at 0x7f..."): strip the
# varying parts so the summary groups them (and its cardinality stays bounded).
_VARYING = re.compile(r"0x[0-9a-f]+|\d+")


class RateLimited:
    """One kind of WARNING, limited to ``limit()`` full lines per minute."""

    def __init__(self, what: str, limit: Callable[[], int]) -> None:
        self.what = what
        self.limit = limit
        self.lock = _cleanup._allocate_lock()
        self.window_start = time.monotonic()
        self.logged = 0
        self.suppressed = 0
        self.sources: Counter[str] = Counter()
        _cleanup.add_periodic(self.flush)

    def warn(self, source: object, msg: str, *args: object) -> None:
        """Log ``msg % args`` in full, or count it (by ``str(source)``) for the next summary.

        Nothing at all when WARNINGs of the ``greenscope`` logger are off: the counters
        that matter are greenscope's own, and a summary would not be logged either.
        """
        if not logger.isEnabledFor(logging.WARNING):
            return
        self.flush()
        with self.lock:
            full = self.logged < self.limit()
            if full:
                self.logged += 1
            else:
                self.suppressed += 1
                self.sources[_VARYING.sub("N", str(source))] += 1
        if full:
            logger.warning(msg, *args)

    def flush(self, force: bool = False) -> None:
        """Log the summary of the window that ended (or of the current one, if ``force``)."""
        now = time.monotonic()
        with self.lock:
            if not force and now - self.window_start < _WINDOW:
                return
            suppressed, sources = self.suppressed, self.sources
            self.window_start, self.logged, self.suppressed = now, 0, 0
            self.sources = Counter()
        if suppressed:
            top = ", ".join(f"{name} ({n})" for name, n in sources.most_common(3))
            logger.warning(
                "greenscope: %d more %s in the last minute, not logged one by one; most "
                "from: %s. greenscope.stats() has exact counts.",
                suppressed,
                self.what,
                top,
            )
