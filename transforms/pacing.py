"""The rate side of admission: when the RPM and TPM in force let the next request go.

* **Pacing** (GCRA: a leaky bucket with no burst). With an RPM or TPM limit each request is let
  through one emission interval after the previous one (for tokens, its reservation's share), at
  ``PACE`` of the limit. Providers may enforce a per-minute limit over one second (OpenAI: 60,000
  RPM as 1,000 a second): a client holding a second of budget and spending it at once draws 429s
  there, while an even pace a little under the limit fills no window, short or long. A late
  event loop makes good up to 5 ms of its lateness and never bursts after an idle spell.
* **Headroom the server reports.** Each response's ``x-ratelimit-remaining-*``, minus what was sent
  since that request, is credit that admits at once: a server enforcing over 60 seconds lets a
  short run go as fast as its concurrency. ``x-ratelimit-limit-*`` below what we were told wins,
  and without ``--rpm/--tpm`` the limits are learned from it. A 429 on a request the credit let
  through stops trusting the credit for a minute.
* Paced 429s that cluster slow the pace by 2% at a time; successes give it back slowly.

The queue, the concurrency limit and the shared pause are the ``Scheduler``'s (transforms.admission).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["PACE", "Pacing", "retry_delay"]

# Share of the limit we pace at, at most: the slack absorbs arrival jitter at a per-second window
# (50 a second at 99% leaves 10 ms per window). A rejected request costs a provider's window
# nothing, so a stray 429 is only retried; when 429s cluster (over about 0.7% of recent requests:
# a busy machine, a long network path, a server stricter than its headers) the pace drops 2%, and
# each success gives back _PACE_RECOVERY.
PACE = 0.99
_PACE_START, _PACE_FLOOR, _PACE_RECOVERY = 0.99, 0.8, 0.0001
_PRESSURE_DECAY, _PRESSURE_LIMIT = 0.995, 1.5
# Headroom kept in hand when spending what the server reports: two requests' worth plus a share
# of the most it ever reported (a window's capacity), against its clock and ours disagreeing.
_CREDIT_MARGIN, _CREDIT_SHARE = 2, 0.05
_DISTRUST_SECONDS = 60.0
_CATCH_UP = 0.005


class Pacing:
    """The RPM and TPM in force, their even pace (GCRA), and the headroom the server last reported."""

    def __init__(self, *, rpm: int | None, tpm: int | None, shared_by: int) -> None:
        self.rpm, self.tpm = rpm, tpm  # in force: what we were told, lowered by the server's headers
        # Processes sharing the provider's budget (Dask workers): the server's headers describe the
        # whole budget, of which this process may take its share only.
        self.shared_by = shared_by
        self.pace = _PACE_START
        self._pressure = 0.0  # recent paced 429s, decaying per success
        self._next_request = -math.inf  # GCRA theoretical arrival times
        self._next_tokens = -math.inf
        self._largest = 0  # the largest token reservation so far
        self._credit: dict[str, tuple[float, float]] = {}  # kind -> (remaining, our seq when it was sent)
        self._credit_seq: dict[str, int] = {}
        self._credit_peak: dict[str, float] = {}
        self._distrust_until = -math.inf
        self._seq = 0  # requests admitted so far
        self._tokens_seq = 0.0  # tokens they reserved
        self._prompt_estimates = 0  # estimated prompt tokens of every admission
        self._token_bound = 0  # admissions that waited for the token pace

    @property
    def limited(self) -> bool:
        """True when an RPM or TPM is in force (told or learned from the headers)."""
        return bool(self.rpm or self.tpm)

    def ready(self) -> float:
        """The loop time from which the pace lets the next request go."""
        ready = -math.inf
        if self.rpm:
            ready = max(ready, self._next_request)
        if self.tpm:
            ready = max(ready, self._next_tokens)
        return ready

    def token_bound(self, ready: float) -> bool:
        """True when ``ready`` is the token pace's slot: the wait is for TPM."""
        return bool(self.tpm) and ready == self._next_tokens

    def admitted(self, now: float, reserved: int, *, estimated: int, token_bound: bool) -> tuple[int, float]:
        """Move the pace on by a request admitted at ``now``; the requests and tokens admitted so far, it included."""
        self._seq += 1
        self._tokens_seq += reserved
        self._prompt_estimates += estimated
        self._token_bound += token_bound
        if self.rpm:
            self._next_request = _next_slot(self._next_request, now, 60.0 / (self.rpm * self.pace))
        if self.tpm:
            self._largest = max(self._largest, reserved)
            self._next_tokens = _next_slot(self._next_tokens, now, reserved * 60.0 / self._token_rate())
        return self._seq, self._tokens_seq

    def _token_rate(self) -> float:
        """Tokens a minute to pace at: a second's window also holds the request that starts it.

        Paced at R a second, a one-second window holds R plus one request's tokens; with requests
        a sizeable share of the per-second budget B (60,000 TPM is 1,000 a second, a request 70)
        the pace is B less the largest reservation, never under half of B.
        """
        assert self.tpm
        return max(self.tpm / 2, min(self.tpm * self.pace, self.tpm - 60.0 * self._largest))

    def credit_allows(self, reserved: int, now: float) -> bool:
        """True when the server's last reported headroom, less what we sent since, covers this request."""
        if now < self._distrust_until or not (self.rpm or self.tpm):
            return False
        needs = {"requests": (self.rpm, 1.0, float(self._seq)), "tokens": (self.tpm, float(reserved), self._tokens_seq)}
        for kind, (limited, amount, sent) in needs.items():
            if not limited:
                continue
            if kind not in self._credit:
                return False
            remaining, sent_then = self._credit[kind]
            margin = _CREDIT_MARGIN * amount + _CREDIT_SHARE * self._credit_peak[kind]
            if remaining - (sent - sent_then) < amount + margin:
                return False
        return True

    def learn(self, headers: Mapping[str, str], answers: tuple[int, float] | None) -> None:
        """Take the limits a response reports, and its headroom when it ``answers`` an admission (seq, tokens_seq)."""
        for kind, attr in (("requests", "rpm"), ("tokens", "tpm")):
            told = _number(headers.get(f"x-ratelimit-limit-{kind}"))
            told = told / self.shared_by if told is not None else None
            if told is not None and told >= 1 and (getattr(self, attr) is None or told < getattr(self, attr)):
                setattr(self, attr, int(told))
        if answers is None:
            return
        seq, tokens_seq = answers
        for kind, sent in (("requests", seq), ("tokens", tokens_seq)):
            remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
            remaining = remaining / self.shared_by if remaining is not None else None
            if remaining is not None and seq >= self._credit_seq.get(kind, 0):
                self._credit[kind] = (remaining, sent)
                self._credit_seq[kind] = seq
                self._credit_peak[kind] = max(self._credit_peak.get(kind, 0.0), remaining)

    def reservation_note(self, output_tokens: int, max_tokens: int) -> str | None:
        """A hint when the TPM pace bound the run and replies were far shorter than ``max_tokens``."""
        if not self.tpm or not self._seq or max_tokens <= 0 or self._token_bound < self._seq / 2:
            return None
        replies = output_tokens / self._seq
        if max_tokens < 4 * max(replies, 1.0):
            return None
        prompt = self._prompt_estimates / self._seq
        suggest = max(16, 16 * math.ceil(2 * replies / 16))  # twice the average reply, in steps of 16
        faster = (prompt + max_tokens) / (prompt + suggest)
        return (
            f"`tpm` bound this run through the reservation, not the answers: each request reserves its prompt "
            f"+ `max_tokens` = {max_tokens} (as OpenAI counts at admission), but replies averaged {replies:.0f} "
            f"tokens. `max_tokens` = {suggest} would let about {faster:.1f}x as many requests through per minute, "
            "if no answer needs more."
        )

    def distrust(self, now: float) -> None:
        """The headroom misled us (a 429 on a request it let through): stop spending it for a while."""
        self._distrust_until = now + _DISTRUST_SECONDS

    def pressed(self) -> None:
        """A fresh 429 while paced: when they cluster, the pace drops 2%."""
        self._pressure += 1.0
        if self._pressure >= _PRESSURE_LIMIT:
            self.pace, self._pressure = max(_PACE_FLOOR, self.pace * 0.98), 0.0

    def eased(self) -> None:
        """A reply came back: the pace creeps back up after a slowdown, and the pressure decays."""
        self.pace = min(PACE, self.pace + _PACE_RECOVERY)
        self._pressure *= _PRESSURE_DECAY


def retry_delay(headers: Mapping[str, str]) -> float | None:
    """The server's explicit retry time: retry-after-ms, else retry-after in seconds."""
    ms = _number(headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000
    return _number(headers.get("retry-after"))


def _next_slot(due: float, now: float, interval: float) -> float:
    """The pace's next slot after an admission at ``now`` of one that was due at ``due``.

    A timer fires up to a millisecond late (epoll rounds up) and a busy loop later still: a
    lateness up to _CATCH_UP keeps the schedule, or 1 ms per 20 ms would cost 5% of the rate;
    after an idle spell the schedule restarts from now, so there is no burst and no early slot.
    """
    return (due if now - due <= min(_CATCH_UP, interval / 2) else now) + interval


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
