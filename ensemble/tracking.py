"""What a person watches: TensorBoard scalars under RUN/tb/<model>/ and one progress line per
model and epoch on the terminal."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

SCALARS = {  # TensorBoard tag -> key of an epoch record
    "train/loss": "loss", "train/lr": "lr", "train/samples_per_s": "samples_per_s",
    "val/errors": "val_errors", "test/errors": "test_errors",
}


class Tracker:
    def __init__(self, tb_dir: Path, out: TextIO | None = None):  # None: sys.stdout when printing
        self.tb_dir, self.out = Path(tb_dir), out
        self.writers = {}

    def _writer(self, model: str):
        if model not in self.writers:
            from torch.utils.tensorboard import SummaryWriter  # slow import: only when used
            self.writers[model] = SummaryWriter(str(self.tb_dir / model))
        return self.writers[model]

    def epoch(self, model: str, epochs: int, record: dict) -> None:
        writer = self._writer(model)
        for tag, key in SCALARS.items():
            writer.add_scalar(tag, record[key], record["epoch"])
        writer.flush()
        self.line(f"{model:<16} epoch {record['epoch']:>3}/{epochs:<3} loss {record['loss']:8.4f}"
                  f"  val {record['val_errors']:>5} err  test {record['test_errors']:>5} err"
                  f"  {record['samples_per_s']:>8,.0f} samples/s")

    def timings(self, seconds: dict[str, float]) -> None:
        """The run's time breakdown as scalars time/<phase> under RUN/tb/run/."""
        writer = self._writer("run")
        for phase, value in seconds.items():
            writer.add_scalar(f"time/{phase.replace(' ', '_')}", value, 0)
        writer.flush()

    def line(self, text: str) -> None:
        print(text, file=self.out or sys.stdout, flush=True)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()
