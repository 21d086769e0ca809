"""The benchmark's pure arithmetic: percentiles of latency lists."""

from __future__ import annotations

import pytest

from streams.bench import percentile


@pytest.mark.parametrize(("values", "fraction", "expected"), [
    ([], 0.5, 0.0),
    ([7.0], 0.5, 7.0),
    ([7.0], 0.99, 7.0),
    ([1.0, 2.0, 3.0, 4.0], 0.5, 3.0),
    ([float(i) for i in range(100)], 0.99, 99.0),
    ([float(i) for i in range(1000)], 0.99, 990.0),
    ([1.0, 2.0], 1.0, 2.0),
])
def test_percentile_is_the_nearest_rank_of_a_sorted_list(values: list[float], fraction: float,
                                                          expected: float) -> None:
    assert percentile(values, fraction) == expected
