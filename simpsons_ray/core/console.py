"""What a person sees in the terminal: the project's own lines and progress bars, Ray's logs kept in Ray's files.

By default a job started from the command line shows only simpsons-ray's lines. Ray's
workers and actors still write everything to the session's log files
(``/tmp/ray/session_latest/logs`` on the node, or ``ray job logs``); ``--verbose``
streams them to the terminal again, with Ray's own INFO lines and debug logging.

Progress bars redraw one line in a terminal. Where the output is a file or a job
log (not a terminal) they print a plain line at each tenth of the way instead, and at
most every 30 s otherwise, so a log stays short and still shows that work moves.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, TextIO

from simpsons_ray.core.clock import clock

# SIMPSONS_RAY_VERBOSE=1 does what --verbose does, for a job whose flags can't be changed.
VERBOSE_ENV = "SIMPSONS_RAY_VERBOSE"
_verbose = os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")

# Ray loggers that print on the driver; their INFO lines are Ray's internals.
_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.util")
# A non-terminal progress line at most this often, besides each tenth of the way.
LOG_LINE_EVERY_S = 30.0
REDRAW_EVERY_S = 0.2  # a terminal redraw at most this often: labeling updates on every batch
_BAR_WIDTH = 28


def set_verbose(verbose: bool) -> None:
    """Choose, once per process, between the quiet default and Ray's full output (the CLI's ``--verbose``)."""
    global _verbose
    _verbose = bool(verbose) or _verbose


def verbose() -> bool:
    return _verbose


def ray_init_kwargs() -> dict[str, Any]:
    """``ray.init`` arguments: workers' output stays in their log files unless verbose."""
    if _verbose:
        return {}
    return {"log_to_driver": False, "logging_level": logging.ERROR}


def init_ray(address: str | None = None) -> None:
    """Start or join Ray with this process's console settings."""
    import ray

    ray.init(address=address, **ray_init_kwargs())
    quiet_ray_loggers()


def quiet_ray_loggers() -> None:
    """Raise the terminal handlers of Ray's driver-side loggers to WARNING; their file handlers keep everything.

    Ray Data configures its logger when it is imported (a file handler into the
    session's ``ray-data.log`` and a console handler), so this runs after that import.
    """
    if _verbose:
        return
    importlib.import_module("ray.data")  # configures the ray.data logger, which this then adjusts
    for name in _RAY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
                handler.setLevel(max(handler.level, logging.WARNING))
                if not any(isinstance(f, _HideRayNotes) for f in handler.filters):
                    handler.addFilter(_HideRayNotes())  # on the handler: records of child loggers skip a logger's filters
        if name != "ray.data":
            logger.setLevel(max(logger.level, logging.WARNING))
    import warnings

    # Ray Data's advice about its own settings, which the pipeline chose on purpose.
    warnings.filterwarnings("ignore", message=r"The minimum number of concurrent actors")


class _HideRayNotes(logging.Filter):
    """Drops Ray Data's notes about settings this project chose on purpose (progress bars off: ours replace them)."""

    NOTES = ("Progress bars disabled", "tqdm is not installed")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(note in message for note in self.NOTES)


class ProgressBar:
    """``label [#######.....] 45% 1,234/2,730 frames  52.1/s  ETA 0:28``: one redrawn line in a terminal.

    ``total`` may grow while the work runs (frames whose count is only known once
    they are listed); an estimated total is shown with a ``~``.
    """

    def __init__(self, label: str, unit: str, total: float | None = None, stream: TextIO | None = None, show_rate: bool = True) -> None:
        self.label, self.unit, self.show_rate = label, unit, show_rate
        self.total = total
        self.estimated = False
        self.done = 0.0
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) and os.environ.get("TERM") != "dumb"
        self._last_line_at = self.started - REDRAW_EVERY_S  # the first update draws
        self._last_tenth = -1
        self._last_done_shown: float | None = None

    def update(self, done: float, total: float | None = None, estimated: bool = False, note: str = "") -> None:
        self.done = done
        if total is not None:
            self.total, self.estimated = total, estimated
        now = time.monotonic()
        if self.tty:
            if now - self._last_line_at >= REDRAW_EVERY_S or (self.total and self.done >= self.total):
                self._last_line_at = now
                self.stream.write("\r" + self.text(note) + "\x1b[K")
                self.stream.flush()
            return
        tenth = int(10 * self.fraction()) if self.total else -1
        if tenth > self._last_tenth or now - self._last_line_at >= LOG_LINE_EVERY_S:
            self._last_tenth = max(tenth, self._last_tenth)
            self._last_line_at = now
            self._write_line(self.text(note))

    def fraction(self) -> float:
        if not self.total:
            return 0.0
        return min(1.0, self.done / self.total)

    def text(self, note: str = "") -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        parts = [self.label]
        if self.total:
            filled = int(round(_BAR_WIDTH * self.fraction()))
            parts.append(f"[{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {100 * self.fraction():3.0f}%")
            parts.append(f"{self.done:,.0f}/{'~' if self.estimated else ''}{self.total:,.0f} {self.unit}")
        else:
            parts.append(f"{self.done:,.0f} {self.unit}")
        if self.show_rate:
            parts.append(f"{rate:,.1f}/s")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {clock((self.total - self.done) / rate)}")
        parts.append(f"{clock(elapsed)} elapsed")
        if note:
            parts.append(note)
        return "  ".join(parts)

    def close(self, note: str = "") -> None:
        """The final state on its own line."""
        line = self.text(note)
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K\n")
            self.stream.flush()
        elif self.done != self._last_done_shown:
            self._write_line(line)

    def _write_line(self, line: str) -> None:
        self._last_done_shown = self.done
        self.stream.write(line + "\n")
        self.stream.flush()


class WorkerLines:
    """Shows on the driver the lines a Ray worker sends while the driver blocks (``trainer.fit()``), behind a progress bar.

    The workers' own output stays in Ray's log files (see the module docstring), so a
    worker that has something to say puts it on :attr:`queue` (a ``ray.util.queue.Queue``
    the worker receives); ``progress(line)`` says how far a line means the work is,
    or None for a line that is only shown. With ``--verbose`` the workers' output
    reaches the terminal itself: there is no queue, and this shows nothing.
    """

    def __init__(self, label: str, unit: str, total: int, progress: Callable[[str], int | None]) -> None:
        self.queue = None
        if not _verbose:
            from ray.util.queue import Queue

            self.queue = Queue(actor_options={"num_cpus": 0})  # no CPU: it must never wait for the work it reports on
        self.bar = ProgressBar(label, unit, total=total, show_rate=False)
        self.progress = progress
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._show, name=f"{label}-lines", daemon=True)

    def _show(self) -> None:
        from ray.util.queue import Empty

        assert self.queue is not None  # the thread starts only with a queue
        while True:
            try:
                line = self.queue.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except Exception:  # noqa: BLE001 - the queue's actor went away: nothing more to show
                return
            done = self.progress(line)
            if done is not None:
                self.bar.done = done
            self.bar.stream.write(f"{self.bar.text()}  {line}\n" if done is not None else f"{self.bar.label}: {line}\n")
            self.bar.stream.flush()

    def __enter__(self) -> "WorkerLines":
        if self.queue is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.queue is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        import ray

        ray.kill(self.queue.actor)  # type: ignore[arg-type]  # a Queue's actor is an ActorHandle
