"""The sink benchmark's lag arithmetic (pure)."""

from __future__ import annotations

from sardis_ledger.sinks.bench import visibility_lags_ms


def test_visibility_lags_pair_each_offset_with_the_first_poll_past_it() -> None:
    sent_at = [[0.0, 0.1, 0.2], [0.05]]
    samples = [[(0.15, 1), (0.3, 1), (0.5, 3)], [(0.1, 0), (0.25, 1)]]
    lags = visibility_lags_ms(sent_at, samples)
    assert [round(x) for x in lags] == [150, 400, 300, 200]
    # Records never seen written are left out, so the caller can tell the run was incomplete.
    assert len(visibility_lags_ms([[0.0, 0.1]], [[(0.2, 1)]])) == 1
