"""The hand-off of whole polls to the worker's decider: order kept, at most one poll waiting."""

from __future__ import annotations

import asyncio

from sardis_ledger.streams.worker.polls import POLLS_WAITING_MAX, PollQueue


async def test_polls_come_out_whole_and_in_order() -> None:
    polls = PollQueue()
    first = {("t", 0): [0, 1, 2]}
    second = {("t", 1): [5], ("t", 0): [3]}
    await polls.put(first, 7)
    assert await polls.get() == (first, 7)
    await polls.put(second, 8)
    records, generation = await polls.get()
    assert records is second and generation == 8
    assert list(records) == [("t", 1), ("t", 0)]


async def test_the_fetcher_waits_while_a_poll_is_waiting() -> None:
    polls = PollQueue()
    for index in range(POLLS_WAITING_MAX):
        await polls.put({("t", 0): [index]}, 1)
    blocked = asyncio.ensure_future(polls.put({("t", 0): [99]}, 1))
    await asyncio.sleep(0.01)
    assert not blocked.done()
    assert await polls.get() == ({("t", 0): [0]}, 1)
    await asyncio.wait_for(blocked, timeout=1)
    assert await polls.get() == ({("t", 0): [99]}, 1)


def test_input_topics_start_empty() -> None:
    # Until the worker names its input topics every record stays Faust's (changelogs).
    assert PollQueue().topics == frozenset()
