"""Prices per model and a spending budget that stops sending before it would be exceeded."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["BATCH_DISCOUNT", "DEFAULT_PRICES", "Budget", "Price", "price_for"]


@dataclass(frozen=True)
class Price:
    """US dollars per million tokens; cached input (the provider's prompt cache) at its own price, if it has one."""

    input_per_million: float
    output_per_million: float
    cached_input_per_million: float | None = None  # None: cached input tokens cost full input price

    def cost(self, input_tokens: float, output_tokens: float, cached_input_tokens: float = 0) -> float:
        """Dollars for so many tokens, ``cached_input_tokens`` of the input served from the prompt cache."""
        cached = min(cached_input_tokens, input_tokens) if self.cached_input_per_million is not None else 0
        return (
            (input_tokens - cached) * self.input_per_million
            + cached * (self.cached_input_per_million or 0.0)
            + output_tokens * self.output_per_million
        ) / 1e6

    def discounted(self, share: float) -> Price:
        """The same price with ``share`` of it off."""
        cached = self.cached_input_per_million
        return Price(
            self.input_per_million * (1 - share),
            self.output_per_million * (1 - share),
            None if cached is None else cached * (1 - share),
        )


BATCH_DISCOUNT = 0.5
"""OpenAI's Batch API and flex tier cost half the standard list price."""


# Standard (non-batch) list prices for OpenAI chat models, USD per 1M tokens: input, output, and
# cached input (prompt caching: 90% off for gpt-5, 75% for gpt-4.1 and o3/o4, 50% for gpt-4o/o3-mini).
# Override them with `input_price`/`output_price`; a model missing here costs nothing in the summary.
DEFAULT_PRICES: dict[str, Price] = {
    "gpt-5": Price(1.25, 10.00, 0.125),
    "gpt-5-mini": Price(0.25, 2.00, 0.025),
    "gpt-5-nano": Price(0.05, 0.40, 0.005),
    "gpt-4.1": Price(2.00, 8.00, 0.50),
    "gpt-4.1-mini": Price(0.40, 1.60, 0.10),
    "gpt-4.1-nano": Price(0.10, 0.40, 0.025),
    "gpt-4o": Price(2.50, 10.00, 1.25),
    "gpt-4o-mini": Price(0.15, 0.60, 0.075),
    "o3": Price(2.00, 8.00, 0.50),
    "o4-mini": Price(1.10, 4.40, 0.275),
    "o3-mini": Price(1.10, 4.40, 0.55),
    "gpt-4-turbo": Price(10.00, 30.00),
    "gpt-4": Price(30.00, 60.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
}


def price_for(model: str, table: Mapping[str, Price]) -> Price | None:
    """The price of a model; a dated snapshot ('gpt-4o-mini-2024-07-18') takes its family's."""
    if model in table:
        return table[model]
    candidates = [name for name in table if model.startswith(name + "-")]
    return table[max(candidates, key=len)] if candidates else None


@dataclass
class Budget:
    """A spending cap: each request reserves its worst case first, then settles the real cost."""

    limit_usd: float
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    refused: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def try_reserve(self, amount_usd: float) -> bool:
        """Reserve an amount, or refuse if spent + reserved + amount would pass the limit."""
        with self._lock:
            if self.spent_usd + self.reserved_usd + amount_usd > self.limit_usd:
                self.refused += 1
                return False
            self.reserved_usd += amount_usd
            return True

    def settle(self, reserved_usd: float, actual_usd: float) -> None:
        """Replace a reservation by what the request really cost."""
        with self._lock:
            self.reserved_usd = max(0.0, self.reserved_usd - reserved_usd)
            self.spent_usd += actual_usd
