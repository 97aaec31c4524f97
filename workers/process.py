"""What every worker-side process does at start: logging from the settings, stop on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from jobs.settings import Settings, get_settings

Loop = Callable[[Settings, threading.Event], None]


def run_until_signalled(loop: Loop) -> int:
    """Run a `loop(settings, stop_event)` service loop until SIGTERM or SIGINT sets the event."""
    s = get_settings()
    logging.basicConfig(level=s.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    loop(s, stop)
    return 0
