"""Serve a stream of independent items concurrently, within a window, out of order.

`answer_concurrently` reads items, runs `handle` on up to `window` of them at once,
and yields each answer as soon as it is ready. A window slot is held from reading an
item until its answer has been yielded (sent), so a client that sends fast, or reads
slowly, is held back by gRPC flow control: reading simply pauses, and memory stays
bounded by the window. When the items run out (the client half-closed), the items in
flight are finished and yielded, then the iteration ends. If the consumer stops early
(the client cancelled), every item still running is cancelled with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from typing import Generic, TypeVar

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class _ReadFailed(Generic[Answer]):
    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Answered(Generic[Item, Answer]):
    """An item's answer, ready to send."""

    __slots__ = ("answer", "item")

    def __init__(self, item: Item, answer: Answer) -> None:
        self.item = item
        self.answer = answer


_DONE = object()


async def answer_concurrently(
    items: AsyncIterable[Item],
    handle: Callable[[Item], Awaitable[Answer]],
    key: Callable[[Item], str],
    duplicate: Callable[[Item], Answer],
    failed: Callable[[Item, Exception], Answer],
    window: int,
    sent: Callable[[Item], None] = lambda item: None,
    widen: Callable[[Callable[[], None]], None] | None = None,
) -> AsyncGenerator[Answer, None]:
    """Answers to `items` in completion order.

    An item whose key is already in flight is answered with `duplicate(item)`; an item
    whose `handle` raises is answered with `failed(item, error)`: one bad item never
    ends the stream. `sent(item)` is told once each item's answer has been sent.
    `widen`, where given, is handed a function that lets the reader read one item past a
    full window: for when `items` stop running what they yield (a server's drain answers
    them at once), and what comes next, the client's half-close included, must be read.
    """
    slots = asyncio.Semaphore(window)
    if widen is not None:
        widen(slots.release)
    ready: asyncio.Queue[object] = asyncio.Queue()
    in_flight: set[str] = set()
    running: set[asyncio.Task[None]] = set()

    async def run(item: Item) -> None:
        try:
            answer = await handle(item)
        except Exception as error:
            answer = failed(item, error)
        finally:
            in_flight.discard(key(item))
        await ready.put(_Answered(item, answer))

    async def read() -> None:
        try:
            source = aiter(items)
            while True:
                # The slot first, then the item: a full window pauses reading (flow control
                # does the rest), and no item is read, holding what reading takes, beyond it.
                await slots.acquire()
                try:
                    item = await anext(source)
                except StopAsyncIteration:
                    slots.release()
                    break
                if key(item) in in_flight:
                    await ready.put(_Answered(item, duplicate(item)))
                    continue
                in_flight.add(key(item))
                task = asyncio.create_task(run(item))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.wait(set(running))
            await ready.put(_DONE)
        except Exception as error:  # reading the stream failed: end it with that error
            await ready.put(_ReadFailed(error))

    reader = asyncio.create_task(read())
    try:
        while (answered := await ready.get()) is not _DONE:
            if isinstance(answered, _ReadFailed):
                raise answered.error
            assert isinstance(answered, _Answered)
            yield answered.answer
            sent(answered.item)
            slots.release()  # only once the answer is sent: unsent answers hold their slot
    finally:
        reader.cancel()
        for task in list(running):
            task.cancel()
        await asyncio.gather(reader, *running, return_exceptions=True)
