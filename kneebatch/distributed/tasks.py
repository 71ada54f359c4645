"""Running many independent tasks: in-process, or on a Dask client with bounded work in flight."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator


def map_unordered(fn: Callable, items: Iterable, client=None, max_in_flight: int | None = None,
                  **kwargs) -> Iterator:
    """Yield ``fn(item, **kwargs)`` results as they finish.

    With a client, at most ``max_in_flight`` tasks are submitted at once (default:
    2 per worker thread), so a cohort of 50,000 studies never floods the scheduler
    and results are handed back (and can be saved) while the rest still runs.
    """
    items = list(items)
    if client is None:
        for item in items:
            yield fn(item, **kwargs)
        return
    from distributed import as_completed

    if max_in_flight is None:
        threads = sum(client.nthreads().values()) or 1
        max_in_flight = 2 * threads
    it = iter(items)
    pending = as_completed()
    for item in it:
        pending.add(client.submit(fn, item, pure=False, **kwargs))
        if pending.count() >= max_in_flight:
            break
    for fut in pending:
        result = fut.result()
        fut.release()
        nxt = next(it, _END)
        if nxt is not _END:
            pending.add(client.submit(fn, nxt, pure=False, **kwargs))
        yield result


_END = object()
