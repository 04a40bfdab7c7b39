"""Progress reporting for long loops: a silent default and a rich progress bar."""

from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Reporter:
    """Silent reporter; subclasses draw progress. The training loop only calls these methods."""

    def start(self, total: int, description: str) -> None:
        pass

    def update(self, completed: int, **fields: float) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def stop(self) -> None:
        pass


class RichReporter(Reporter):
    """A rich progress bar with loss, examples/s and ETA; messages print above it."""

    def __init__(self, console: Optional[Console] = None):
        self.console = console or Console(stderr=True)
        self.progress: Optional[Progress] = None
        self.task = None

    def start(self, total: int, description: str) -> None:
        self.stop()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[ex_s]:.1f} ex/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, loss=float("nan"), ex_s=0.0)

    def update(self, completed: int, **fields: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=completed, **fields)

    def message(self, text: str) -> None:
        (self.progress.console if self.progress else self.console).print(text)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class RowCounter:
    """Rows scored so far, on stderr (``squat predict`` on a terminal); a callable taking the count."""

    def __init__(self, console: Optional[Console] = None):
        self.progress = Progress(TextColumn("predict"), TextColumn("{task.completed:,} rows"), TimeElapsedColumn(),
                                 console=console or Console(stderr=True), transient=True)
        self.task = self.progress.add_task("rows", total=None)
        self.progress.start()

    def __call__(self, done: int) -> None:
        self.progress.update(self.task, completed=done)

    def stop(self) -> None:
        self.progress.stop()
