"""Progress reporting. The harness talks to a :class:`Progress`; the CLI passes a Rich one
(drawn on stderr, so ``--json`` output on stdout stays clean), library users the silent one."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Protocol


class Task(Protocol):
    def advance(self, n: int = 1, **fields: Any) -> None: ...


class Progress:
    """Silent progress: the default for library use and tests."""

    stage_keys: list[str] = []  # the plan's stages (task description prefixes), set by :meth:`begin_plan`
    next_stage: int = 0

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        yield _NullTask()

    def log(self, message: str) -> None:
        pass

    def begin_plan(self, keys: list[str]) -> None:
        """Number the following tasks whose descriptions start with ``keys[k]`` as stage k+1 of n."""
        self.stage_keys, self.next_stage = list(keys), 0

    def numbered(self, description: str) -> str:
        """``description`` as ``[k/n] description`` when it is the next stage of the plan."""
        for index in range(self.next_stage, len(self.stage_keys)):
            if description.startswith(self.stage_keys[index]):
                self.next_stage = index + 1
                return f"[{index + 1}/{len(self.stage_keys)}] {description}"
        return description


class _NullTask:
    def advance(self, n: int = 1, **fields: Any) -> None:
        pass


class RichProgress(Progress):
    """Rich progress bars and log lines on stderr.

    When stderr is not a terminal (a batch job's log file), bars cannot redraw, so a plain line
    ``description: done/total`` is printed at most every ``interval`` seconds instead.
    """

    def __init__(self, console: Any | None = None, interval: float = 30.0, first: float = 5.0) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.interval = interval
        self.first = min(first, interval)  # a log file gets its first line (with an ETA) this soon

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Task]:
        description = self.numbered(description)
        if not self.console.is_terminal:
            line = _LineTask(self.console, description, total, self.interval, self.first)
            yield line
            line.finish()
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeElapsedColumn

        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), _eta_column()]
        with RP(*columns, console=self.console, transient=False) as bar:
            task_id = bar.add_task(description, total=total, status="")
            yield _RichTask(bar, task_id)

    def log(self, message: str) -> None:
        self.console.print(message, highlight=False)


def eta_text(done: float, total: float | None, elapsed: float) -> str:
    """``rate/s, ETA m:ss`` from the mean throughput so far (not a short window, which stays empty
    when updates come slower than it), or ``""`` before the first unit or without a total."""
    if done <= 0 or elapsed <= 0:
        return ""
    rate = done / elapsed
    shown = f"{rate:.3g}/s" if rate >= 0.1 else f"{60 * rate:.3g}/min"
    if total is None:
        return shown
    left = max(0.0, (total - done) / rate)
    return f"{shown}, ETA {int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"


def _eta_column() -> Any:
    from rich.progress import ProgressColumn
    from rich.text import Text

    class EtaColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(eta_text(task.completed, task.total, task.elapsed or 0.0) or "ETA -:--:--", style="cyan")

    return EtaColumn()


class _LineTask:
    def __init__(self, console: Any, description: str, total: int | None, interval: float,
                 first: float | None = None) -> None:
        import time

        self.console, self.description, self.total, self.interval = console, description, total, interval
        self.first = interval if first is None else first
        self.done = 0
        self.printed: int | None = None  # ``done`` at the last printed line
        self.fields: dict[str, Any] = {}
        self.started = self.last = time.monotonic()

    def advance(self, n: int = 1, **fields: Any) -> None:
        import time

        self.done += n
        self.fields = fields
        now = time.monotonic()
        wait = self.first if self.printed is None else self.interval
        if now - self.last >= wait:
            self.last = now
            self._print(now)

    def finish(self) -> None:
        import time

        if self.printed != self.done:  # the last periodic line may already show the final state
            self._print(time.monotonic())

    def _print(self, now: float) -> None:
        self.printed = self.done
        total = f"/{self.total}" if self.total is not None else ""
        eta = eta_text(self.done, self.total, now - self.started) if self.done != self.total else ""
        parts = [f"{self.description}: {self.done}{total}", *(f"{k}={v}" for k, v in self.fields.items()),
                 f"({now - self.started:.0f} s{', ' + eta if eta else ''})"]
        self.console.print(" ".join(parts), highlight=False, markup=False)


class _RichTask:
    def __init__(self, bar: Any, task_id: Any) -> None:
        self.bar, self.task_id = bar, task_id

    def advance(self, n: int = 1, **fields: Any) -> None:
        status = " ".join(f"{k}={v}" for k, v in fields.items())
        self.bar.update(self.task_id, advance=n, status=status)
