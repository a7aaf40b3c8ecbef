"""Percentiles from a Prometheus histogram scraped twice: the difference is what happened in between."""

from __future__ import annotations

import math
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

Buckets = dict[float, float]  # upper bound -> cumulative count


def scrape(url: str, metric: str, labels: dict[str, str]) -> Buckets:
    """The cumulative buckets of one labelled histogram series at `url` (a loopback /metrics endpoint)."""
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback URL we built
        text = response.read().decode()
    buckets: Buckets = {}
    for family in text_string_to_metric_families(text):
        if family.name != metric:
            continue
        for sample in family.samples:
            if sample.name != f"{metric}_bucket":
                continue
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def difference(after: Buckets, before: Buckets) -> Buckets:
    return {bound: count - before.get(bound, 0.0) for bound, count in after.items()}


def quantile(buckets: Buckets, q: float) -> float:
    """Linear interpolation inside the bucket holding the q-quantile, like PromQL's histogram_quantile.

    Returns seconds; NaN without observations; the largest finite bound when the quantile is in +Inf."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return math.nan
    total = buckets[bounds[-1]]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def upper_bound(buckets: Buckets, q: float) -> float:
    """The smallest bucket bound the q-quantile is certainly at or under (seconds; NaN without observations)."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return math.nan
    rank = q * buckets[bounds[-1]]
    return next(bound for bound in bounds if buckets[bound] >= rank)


def count(buckets: Buckets) -> int:
    return int(buckets[max(buckets)]) if buckets else 0
