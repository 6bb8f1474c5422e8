"""greenscope: SQLAlchemy sessions scoped to greenlets, cleaned up when greenlets end.

The public API is exactly ``__all__``; every other module whose name starts with ``_`` is
private and may change without notice.
"""

from greenscope._cleanup import CleanupSettings, configure_cleanup
from greenscope._debug import set_debug
from greenscope._engines import register_engine
from greenscope._guard import guard_engine
from greenscope._registry import (
    GreenletRegistry,
    RegistryStats,
    close_all,
    current_sessions,
    registries,
    remove_current,
    stats,
    wait_reaped,
)
from greenscope._scoping import scoped_session, session_scope

__all__ = [
    "CleanupSettings",
    "GreenletRegistry",
    "RegistryStats",
    "close_all",
    "configure_cleanup",
    "current_sessions",
    "guard_engine",
    "register_engine",
    "registries",
    "remove_current",
    "scoped_session",
    "session_scope",
    "set_debug",
    "stats",
    "wait_reaped",
]

__version__ = "0.2.0.dev0"
