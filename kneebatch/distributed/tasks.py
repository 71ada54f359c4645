"""Running many independent tasks: in-process, or on a Dask client with bounded work in flight."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator


class Solo(list):
    """An item (a list) that runs with nothing else in flight: a worker death during it
    can then only be its own doing, not that of a task sharing the worker."""


def retry_alone(item, exc, poison: Callable):
    """``on_error`` for an item whose task killed its worker: run it once more with nothing else
    in flight (it may only have shared the worker with the culprit); if it kills its worker even
    alone, ``poison(item, exc)`` is its result (a failure row, never a retry forever)."""
    if not isinstance(item, Solo):
        return None, [Solo(item)]
    return poison(item, exc), []


def died_message(exc: BaseException) -> str:
    return f"the worker died on every try ({type(exc).__name__})"


def map_unordered(fn: Callable, items: Iterable, client=None, max_in_flight: int | None = None,
                  on_error: Callable | None = None, **kwargs) -> Iterator:
    """Yield ``fn(item, **kwargs)`` results as they finish.

    With a client, at most ``max_in_flight`` tasks are submitted at once (default:
    2 per worker thread), so a cohort of 50,000 studies never floods the scheduler
    and results are handed back (and can be saved) while the rest still runs.

    ``on_error(item, exc) -> (result or None, [new items])`` handles a task that failed
    as a whole (with Dask: its worker died ``allowed-failures`` times): a result to
    yield in its place and/or smaller items to run instead. Without it, errors raise.
    """
    queue = deque(items)
    if client is None:
        while queue:
            item = queue.popleft()
            try:
                result = fn(item, **kwargs)
            except Exception as e:
                if on_error is None:
                    raise
                result, more = on_error(item, e)
                queue.extend(more)
                if result is None:
                    continue
            yield result
        return
    from distributed import as_completed

    if max_in_flight is None:
        threads = sum(client.nthreads().values()) or 1
        max_in_flight = 2 * threads
    pending = as_completed()
    items_of = {}

    def submit():
        while queue and pending.count() < max_in_flight:
            if any(isinstance(i, Solo) for i in items_of.values()):
                return  # nothing beside a solo item
            if isinstance(queue[0], Solo) and pending.count():
                return  # a solo item waits until the rest has finished
            item = queue.popleft()
            fut = client.submit(fn, item, pure=False, **kwargs)
            items_of[fut.key] = item
            pending.add(fut)

    submit()
    for fut in pending:
        item = items_of.pop(fut.key)
        try:
            result = fut.result()
        except Exception as e:
            if on_error is None:
                raise
            result, more = on_error(item, e)
            queue.extend(more)
        finally:
            fut.release()
        submit()
        if result is not None:
            yield result
