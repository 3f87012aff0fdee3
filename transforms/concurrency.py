"""How many requests may be in flight at once: AIMD with a slow start, and a cap learned from 429s.

* **Concurrency** (AIMD with a slow start, ``+1`` per success until the first 429). A 429 about
  concurrency (no retry time, no rate-limit code: a server capping requests in flight) sets the
  limit just below the number in flight when that request went, so the server's cap is learned
  rather than halved past; a probe one above it goes after a doubling number of successes.
* Unpaced, a 429 about rate halves the limit (the ``Scheduler`` does so at most once per pause).

The queue and the count of requests in flight are the ``Scheduler``'s (transforms.admission).
"""

from __future__ import annotations

import math

__all__ = ["Concurrency"]

# Successes between probes one above a learned concurrency cap; doubles per failed probe.
_PROBE_EVERY, _PROBE_MAX = 200, 1600
# In slow start one more request in flight than ever before goes at most this often, so the 429
# of a server capping requests in flight (answered at once) stops the ramp one over the cap.
_RAMP_GAP = 0.025


class Concurrency:
    """The limit on requests in flight: grown per success, cut by 429s, capped where the server caps."""

    def __init__(self, *, max_concurrency: int, initial: int | None, paced: bool) -> None:
        self.max_concurrency = max_concurrency
        # With explicit limits the pacing shapes the run; without, start small and probe.
        start = max_concurrency if paced else min(max_concurrency, 4)
        self.limit = float(min(initial or start, max_concurrency))
        self._slow_start = not paced
        self._high = 0  # the most requests ever in flight at once
        self._ramp_at = -math.inf
        self._cap: int | None = None  # a concurrency cap learned from 429s
        self._since_probe = 0
        self._probe_every = _PROBE_EVERY
        self._probing = False

    def full(self, in_flight: int) -> bool:
        """True when ``in_flight`` requests are all the limit lets go."""
        return in_flight >= max(1, int(self.limit))

    def ramp_wait(self, in_flight: int, now: float) -> float | None:
        """In slow start, the time before which one more request than ever before may not go; else None."""
        if self._slow_start and in_flight >= self._high and now < self._ramp_at:
            return self._ramp_at
        return None

    def granted(self, in_flight: int, now: float) -> None:
        """A request went at ``now`` with ``in_flight`` requests in flight, itself included."""
        if in_flight > self._high:
            self._high, self._ramp_at = in_flight, now + _RAMP_GAP

    def answered(self, in_flight: int) -> None:
        """A request that went with ``in_flight`` in flight was answered: a probe at that count held."""
        if self._probing and self._cap is not None and in_flight >= self._cap:
            self._probing, self._probe_every = False, _PROBE_EVERY  # the probe held: a new cap

    def capped(self, in_flight: int) -> None:
        """A 429 about concurrency on a request that went with ``in_flight`` in flight."""
        # More than the server takes were in flight: its cap is below this request's count.
        cap = max(1, in_flight - 1)
        if self._probing:  # the probe above the cap failed: wait twice as long for the next
            self._probing = False
            self._probe_every = min(_PROBE_MAX, self._probe_every * 2)
        self._cap = cap if self._cap is None else min(self._cap, cap)
        self.limit = float(max(1, min(int(self.limit), self._cap)))
        self._slow_start = False
        self._since_probe = 0

    def halved(self) -> None:
        """An unpaced 429 about rate: the slow start ends and the limit halves."""
        self._slow_start = False
        self.limit = max(1.0, self.limit / 2)

    def grown(self) -> bool:
        """A success: +1 in slow start, else +1 per window, or a probe above the cap; False when nothing changed."""
        if self.limit >= self.max_concurrency:
            return False
        if self._cap is not None and self.limit >= self._cap:
            self._since_probe += 1
            if self._since_probe < self._probe_every:
                return False
            self._since_probe = 0
            self._cap += 1  # probe one above; a 429 there sets it back and doubles the wait
            self._probing = True
            self.limit = float(min(self.max_concurrency, self._cap))
        else:
            step = 1.0 if self._slow_start else 1.0 / max(self.limit, 1.0)
            self.limit = min(float(self.max_concurrency), self.limit + step)
        return True
