"""Progress bars for long work (rich), silent when asked or when output is not a terminal."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def progress_bar(total: int, description: str, show: bool | None = None, unit: str = "studies"):
    """Yields ``advance(n=1)``. Shows a rate in ``unit``/s: done over the time since the bar began
    (results come in batches, so a rate between two arrivals would jump to thousands per second)."""
    show = sys.stderr.isatty() if show is None else show
    if not show:
        yield lambda n=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("[cyan]{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total, rate="")
        t0, done = time.monotonic(), 0

        def advance(n=1):
            nonlocal done
            done += n
            bar.update(task, advance=n, rate=rate_text(done, time.monotonic() - t0, unit))

        yield advance


def rate_text(done: int, seconds: float, unit: str) -> str:
    """``0.42 studies/s``, or ``95 s each`` when slower than one a minute; empty before anything
    is done."""
    if done <= 0 or seconds <= 0:
        return ""
    rate = done / seconds
    return f"{rate:.2f} {unit}/s" if rate >= 1 / 60 else f"{seconds / done:.0f} s each"


@contextmanager
def budget_bar(seconds: float, description: str, show: bool | None = None, done: float = 0.0):
    """A bar over a time budget (training): yields ``update(elapsed_s, text)``; the text (step,
    loss, ...) replaces the description, the bar and its time left follow the budget."""
    show = sys.stderr.isatty() if show is None else show
    if not show:
        yield lambda elapsed, text="": None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TextColumn("left"),
               TextColumn("{task.fields[left]}"))
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=seconds, completed=done, left="")

        def update(elapsed, text=""):
            left = max(0.0, seconds - elapsed)
            bar.update(task, completed=min(elapsed, seconds), description=text or description,
                       left=f"{int(left // 60)}:{int(left % 60):02d}")

        yield update


def progress_map(fn, items, workers: int = 1, description: str = "", show: bool | None = None):
    """``[fn(x) for x in items]`` over a process pool, in input order, with a bar."""
    items = list(items)
    results = [None] * len(items)
    with progress_bar(len(items), description, show) as advance:
        if workers <= 1:
            for i, item in enumerate(items):
                results[i] = fn(item)
                advance()
            return results
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
            for fut in as_completed(futures):
                results[futures[fut]] = fut.result()
                advance()
    return results
