"""What a person watches: TensorBoard under RUN/tb/ and the progress on the terminal.

TensorBoard: scalars per model and epoch (RUN/tb/<model>/), each finished model's
hyperparameters with its final errors (the HParams view) and its test confusion matrix, and under
RUN/tb/run/ the run's config as text, its time breakdown, and the coordinator's figures.

Terminal: on a TTY one live line per model in training (epoch, loss, errors, samples/s, ETA),
redrawn in place, each moving up into the log once its model is done; otherwise (a pipe, a file,
CI) the same text as one plain line per model and epoch.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

SCALARS = {  # TensorBoard tag -> key of an epoch record
    "train/loss": "loss", "train/lr": "lr", "train/samples_per_s": "samples_per_s",
    "val/errors": "val_errors", "test/errors": "test_errors",
}
FINAL = {"hparams/val_errors": "val_errors", "hparams/test_errors": "test_errors",
         "hparams/parameters": "parameters", "hparams/wall_seconds": "wall_seconds"}


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def epoch_text(model: str, epochs: int, record: dict) -> str:
    left = record["seconds"] * (epochs - record["epoch"])
    return (f"{model:<16} epoch {record['epoch']:>3}/{epochs:<3} loss {record['loss']:8.4f}"
            f"  val {record['val_errors']:>5} err  test {record['test_errors']:>5} err"
            f"  {record['samples_per_s']:>8,.0f} samples/s  ETA {clock(left)}")


class Tracker:
    def __init__(self, tb_dir: Path, out: TextIO | None = None, live: bool | None = None):
        """`out`: where progress goes (None: sys.stdout at the time of printing); `live`: redraw
        one line per model in place (None: when `out` is a terminal)."""
        self.tb_dir, self.out, self._live = Path(tb_dir), out, live
        self.writers = {}
        self._lock = threading.Lock()  # the writers are shared with the figure thread
        self._drawing = threading.Lock()  # one figure at a time, off the driver's path
        self._pending: list[threading.Thread] = []
        self._failed: list[BaseException] = []
        self.rows: dict[str, str] = {}  # model in training -> its live line
        self.drawn = 0  # lines of the live block now on the screen

    # ------------------------------------------------------------ terminal -----------------------
    @property
    def stream(self) -> TextIO:
        return self.out or sys.stdout

    @property
    def live(self) -> bool:
        if self._live is None:
            isatty = getattr(self.stream, "isatty", None)
            return bool(isatty and isatty())
        return self._live

    def line(self, text: str) -> None:
        """A lasting line of the log (above the live block on a terminal)."""
        if self.live:
            self._erase()
            self.stream.write(text + "\n")
            self._draw()
        else:
            print(text, file=self.stream, flush=True)

    def started(self, model: str, epoch: int, epochs: int) -> None:
        if self.live:
            self.rows[model] = f"{model:<16} epoch {epoch + 1:>3}/{epochs:<3} starting"
            self._redraw()

    def done(self, model: str) -> None:
        """`model` stopped (finished or failed): its last line leaves the live block for the log."""
        text = self.rows.pop(model, None)
        if self.live and text is not None:
            self.line(text)

    def _erase(self) -> None:
        if self.drawn:
            self.stream.write(f"\x1b[{self.drawn}F\x1b[J")  # up to the block's start, clear below
            self.drawn = 0

    def _draw(self) -> None:
        for text in self.rows.values():
            self.stream.write(f"{text}\n")
        self.drawn = len(self.rows)
        self.stream.flush()

    def _redraw(self) -> None:
        self._erase()
        self._draw()

    # ------------------------------------------------------------ TensorBoard --------------------
    def _writer(self, model: str):
        with self._lock:
            if model not in self.writers:
                from torch.utils.tensorboard import SummaryWriter  # slow import: only when used
                self.writers[model] = SummaryWriter(str(self.tb_dir / model))
            return self.writers[model]

    def epoch(self, model: str, epochs: int, record: dict) -> None:
        writer = self._writer(model)
        for tag, key in SCALARS.items():
            writer.add_scalar(tag, record[key], record["epoch"])
        writer.flush()
        text = epoch_text(model, epochs, record)
        if self.live:
            self.rows[model] = text
            self._redraw()
        else:
            self.line(text)

    def finished(self, model: str, hparams: dict, summary: dict) -> None:
        """A finished model's hyperparameters and final numbers, for TensorBoard's HParams view
        (one session per model: RUN/tb/<model>)."""
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        final = {tag: summary[key] for tag, key in FINAL.items() if summary.get(key) is not None}
        writer = self._writer(model)
        for part in hparams_summary(hparams, final):
            writer._get_file_writer().add_summary(part)
        for tag, value in final.items():
            writer.add_scalar(tag, value, summary.get("epochs", 0))
        writer.flush()

    def text(self, model: str, tag: str, markdown: str) -> None:
        writer = self._writer(model)
        writer.add_text(tag, markdown)
        writer.flush()

    def image(self, model: str, tag: str, draw: Callable[[], bytes], step: int = 0) -> None:
        """The figure `draw` returns (PNG bytes) under RUN/tb/<model>/, drawn on a thread of its
        own so that drawing (a second or more) never holds up training; close() waits for it."""
        # a plain thread: an executor refuses work once the interpreter starts to exit, and the
        # CLI may run on a thread that outlives the main one (tests/multinode.py)
        thread = threading.Thread(target=self._image, args=(model, tag, draw, step),
                                  name="figure")
        self._pending = [t for t in self._pending if t.is_alive()]  # drop the figures drawn
        self._pending.append(thread)
        thread.start()

    def _image(self, model: str, tag: str, draw: Callable[[], bytes], step: int) -> None:
        import io

        import numpy as np
        from PIL import Image

        try:
            with self._drawing:
                pixels = np.asarray(Image.open(io.BytesIO(draw())).convert("RGB"))
                writer = self._writer(model)
                writer.add_image(tag, pixels, step, dataformats="HWC")
                writer.flush()
        except BaseException as err:  # raised again by close()
            self._failed.append(err)

    def timings(self, seconds: dict[str, float]) -> None:
        """The run's time breakdown as scalars time/<phase> under RUN/tb/run/."""
        writer = self._writer("run")
        for phase, value in seconds.items():
            writer.add_scalar(f"time/{phase.replace(' ', '_')}", value, 0)
        writer.flush()

    def close(self) -> None:
        """Wait for the figures still being drawn (raising the first error), then close."""
        pending, self._pending = self._pending, []
        try:
            for thread in pending:
                thread.join()
            if self._failed:
                raise self._failed.pop(0)
        finally:
            self._close()

    def _close(self) -> None:
        if self.live:  # the models still in the block keep their last line in the log
            self._erase()
            self.stream.write("".join(f"{text}\n" for text in self.rows.values()))
            self.rows.clear()
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
