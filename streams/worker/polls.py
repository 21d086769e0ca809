"""The hand-off of whole polls from Faust's fetcher to the worker's decider (compat workaround 16)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Final

# Polls fetched but not yet taken by the decider. One: the fetcher reads the next poll while the
# decider works through the current one, and no further (the consumer thread prefetches too).
POLLS_WAITING_MAX: Final[int] = 1

Poll = tuple[Mapping[Any, Sequence[Any]], int]


class PollQueue:
    """Polls (records per partition, and the consumer generation they were fetched in) on
    their way to the decider; the fetcher waits while POLLS_WAITING_MAX are waiting."""

    def __init__(self) -> None:
        self._polls: asyncio.Queue[Poll] = asyncio.Queue(maxsize=POLLS_WAITING_MAX)
        # The input topics (full names) whose records come here: the worker adds each agent's
        # topics as it defines the agent. Other topics' records (changelogs) stay Faust's.
        self.topics: frozenset[str] = frozenset()

    async def put(self, records: Mapping[Any, Sequence[Any]], generation: int) -> None:
        await self._polls.put((records, generation))

    async def get(self) -> Poll:
        return await self._polls.get()
