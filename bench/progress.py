"""Progress reporting. The harness talks to a :class:`Progress`; the CLI passes a Rich one
(drawn on stderr, so ``--json`` output on stdout stays clean), library users the silent one."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Protocol


class Task(Protocol):
    def advance(self, n: int = 1, **fields: Any) -> None: ...


class Progress:
    """Silent progress: the default for library use and tests."""

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        yield _NullTask()

    def log(self, message: str) -> None:
        pass


class _NullTask:
    def advance(self, n: int = 1, **fields: Any) -> None:
        pass


class RichProgress(Progress):
    """Rich progress bars and log lines on stderr.

    When stderr is not a terminal (a batch job's log file), bars cannot redraw, so a plain line
    ``description: done/total`` is printed at most every ``interval`` seconds instead.
    """

    def __init__(self, console: Any | None = None, interval: float = 30.0) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.interval = interval

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        if not self.console.is_terminal:
            line = _LineTask(self.console, description, total, self.interval)
            yield line
            line.finish()
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress as RP,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with RP(*columns, console=self.console, transient=False) as bar:
            task_id = bar.add_task(description, total=total, status="")
            yield _RichTask(bar, task_id)

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False)


class _LineTask:
    def __init__(self, console: Any, description: str, total: int | None, interval: float) -> None:
        import time

        self.console, self.description, self.total, self.interval = console, description, total, interval
        self.done = 0
        self.printed: int | None = None  # ``done`` at the last printed line
        self.fields: dict[str, Any] = {}
        self.started = self.last = time.monotonic()

    def advance(self, n: int = 1, **fields: Any) -> None:
        import time

        self.done += n
        self.fields = fields
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def finish(self) -> None:
        import time

        if self.printed != self.done:  # the last periodic line may already show the final state
            self._print(time.monotonic())

    def _print(self, now: float) -> None:
        self.printed = self.done
        total = f"/{self.total}" if self.total is not None else ""
        parts = [f"{self.description}: {self.done}{total}", *(f"{k}={v}" for k, v in self.fields.items()),
                 f"({now - self.started:.0f} s)"]
        self.console.print(" ".join(parts), highlight=False, markup=False)


class _RichTask:
    def __init__(self, bar: Any, task_id: Any) -> None:
        self.bar, self.task_id = bar, task_id

    def advance(self, n: int = 1, **fields: Any) -> None:
        status = " ".join(f"{k}={v}" for k, v in fields.items())
        self.bar.update(self.task_id, advance=n, status=status)
