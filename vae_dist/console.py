"""What a person sees on the terminal: rich progress bars on a TTY, plain timestamped lines elsewhere.

Only the main process gets a live Console; other ranks get `Console(enabled=False)`, whose methods
do nothing, so the trainer never asks which rank it is on before printing.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console as RichConsole
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class Console:
    def __init__(self, enabled: bool = True, interactive: bool | None = None):
        self.enabled = enabled
        self.interactive = sys.stdout.isatty() if interactive is None else interactive
        self.rich = RichConsole(highlight=False) if enabled else None
        self.progress: Progress | None = None
        self._epoch_task = self._step_task = None

    def print(self, message: str) -> None:
        """A plain line, timestamped when the output is a log file (SLURM) rather than a terminal."""
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(message)
        elif self.interactive:
            self.rich.print(message)
        else:
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", flush=True)

    def start(self, epochs: int, steps_per_epoch: int, first_epoch: int, first_step_in_epoch: int) -> None:
        if not (self.enabled and self.interactive):
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.rich,
            transient=False,
        )
        self.progress.start()
        self._epoch_task = self.progress.add_task("epochs", total=epochs, completed=first_epoch, info="")
        self._step_task = self.progress.add_task("steps", total=steps_per_epoch, completed=first_step_in_epoch, info="")

    def new_epoch(self, epoch: int, steps_per_epoch: int) -> None:
        if self.progress is not None:
            self.progress.reset(self._step_task, total=steps_per_epoch, description=f"epoch {epoch + 1}", info="")

    def advance_steps(self, n: int, info: str | None = None) -> None:
        """Called at the logging interval, not every step: keeps per-step work to a counter."""
        if self.progress is not None:
            self.progress.update(self._step_task, advance=n, **({"info": info} if info else {}))
        elif info:
            self.print(info)

    def end_epoch(self, info: str) -> None:
        if self.progress is not None:
            self.progress.update(self._epoch_task, advance=1, info=info)
        else:
            self.print(info)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def table(self, title: str, rows: list[tuple[str, str]]) -> None:
        if not self.enabled:
            return
        if self.interactive:
            table = Table(title=title, show_header=False)
            for key, value in rows:
                table.add_row(key, value)
            self.rich.print(table)
        else:
            for key, value in rows:
                self.print(f"{title}: {key}: {value}")
