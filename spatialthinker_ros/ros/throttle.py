"""Warnings about input the node keeps receiving (bad frames, failing requests), at a rate a log can take."""

from __future__ import annotations

import math
import time

WARN_THROTTLE_S = 5.0


class ThrottledWarnings:
    """At most one warning per key every WARN_THROTTLE_S, saying how many like it were left out."""

    def __init__(self, logger, period_s: float = WARN_THROTTLE_S):
        self._logger, self._period_s = logger, period_s
        self._last: dict[str, tuple[float, int]] = {}   # key -> (last logged, suppressed since)

    def __call__(self, key: str, message: str) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-math.inf, 0))
        if now - last >= self._period_s:
            self._last[key] = (now, 0)
            more = f" (and {suppressed} more like it since the last report)" if suppressed else ""
            self._logger.warning(message + more)
        else:
            self._last[key] = (last, suppressed + 1)
