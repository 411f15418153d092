"""The run directory, written only by the driver:

    RUN/config.yaml                    the resolved config (what --resume reads back)
    RUN/checkpoints/<model>/epoch-NNNN.safetensors   the last two per model
    RUN/metrics.json                   per model: status, summary, every epoch's metrics; the
                                       last session's time breakdown
    RUN/summary.md                     one row per model
    RUN/tb/<model>/                    TensorBoard scalars (ensemble.tracking)

RUN is a local path or a URI (`s3://bucket/run`, `gs://...`, `file:///...`): a URI is read and
written through `pyarrow.fs` (the `uri` extra), with a local copy as staging area that
`sync()` mirrors to it after every epoch, so no node needs a shared file system.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from ensemble import checkpoint
from ensemble.config import ModelConfig, RunConfig, parse, saved_as, to_dict
from ensemble.errors import CheckpointError, ConfigError


class RunDir:
    def __init__(self, location: str | Path):
        self.location = str(location)  # what the user named: a path or a URI
        self.fs = None
        if "://" not in self.location:
            self.path = Path(location)
            return
        try:
            from pyarrow import fs
        except ImportError:
            raise ConfigError(f"a run directory URI ({self.location}) needs pyarrow: "
                              "pip install -e '.[uri]'") from None
        try:
            self.fs, self.root = fs.FileSystem.from_uri(self.location)
        except Exception as err:  # pyarrow raises several types for a URI it cannot use
            raise ConfigError(f"cannot open the run directory {self.location}: "
                              f"{str(err).splitlines()[0]}") from None
        self.path = Path(tempfile.mkdtemp(prefix="ensemble-run-"))  # the staging copy
        self._synced: dict[str, tuple[int, int]] = {}
        self._pull()

    @property
    def name(self) -> str:
        if self.fs is None:
            return self.path.resolve().name
        return self.location.rstrip("/").rsplit("/", 1)[-1]

    # ------------------------------------------------------------ URI mirroring ------------------
    def _pull(self) -> None:
        from pyarrow import fs

        selector = fs.FileSelector(self.root, recursive=True, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.type != fs.FileType.File or info.path.endswith(".tmp"):
                continue
            local = self.path / info.path[len(self.root):].lstrip("/")
            local.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(info.path) as src:
                local.write_bytes(src.read())
            stat = local.stat()
            self._synced[str(local.relative_to(self.path))] = (stat.st_size, stat.st_mtime_ns)

    def sync(self) -> None:
        """Mirror the staging copy to the URI: upload what changed (to a temporary name, then
        moved into place), delete what was deleted here. A local run directory needs nothing."""
        if self.fs is None:
            return
        current = {}
        for local in self.path.rglob("*"):
            if local.is_file() and not local.name.endswith(".tmp"):
                stat = local.stat()
                current[str(local.relative_to(self.path))] = (stat.st_size, stat.st_mtime_ns)
        for rel, stamp in current.items():
            if self._synced.get(rel) == stamp:
                continue
            target = self._remote(rel)
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(target + ".tmp") as out:
                out.write((self.path / rel).read_bytes())
            self.fs.move(target + ".tmp", target)
        for rel in set(self._synced) - set(current):
            self.fs.delete_file(self._remote(rel))
        self._synced = current

    def _remote(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def _probe_remote(self) -> None:
        """Refuse at once a URI run directory that cannot be written: a probe file written and
        deleted there (and the folder, if the probe made it)."""
        from pyarrow import fs

        probe = self._remote(".ensemble-probe")
        try:
            made = self.fs.get_file_info(self.root).type == fs.FileType.NotFound
            self.fs.create_dir(self.root, recursive=True)
            with self.fs.open_output_stream(probe) as out:
                out.write(b"")
            self.fs.delete_file(probe)
            if made:
                self.fs.delete_dir(self.root)
        except Exception as err:  # pyarrow raises OSError and its own types
            shutil.rmtree(self.path, ignore_errors=True)  # the staging copy: nothing started
            raise ConfigError(f"cannot write the run directory {self.location}: "
                              f"{(str(err).splitlines() or [type(err).__name__])[0]}") from None

    def close(self) -> None:
        """Final sync, then drop the staging copy of a URI run directory (whatever the sync
        did)."""
        if self.fs is not None:
            try:
                self.sync()
            finally:
                shutil.rmtree(self.path, ignore_errors=True)

    # ------------------------------------------------------------ config -------------------------
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    def exists(self) -> bool:
        return self.path.is_file() or (self.path.is_dir() and any(self.path.iterdir()))

    def load_config(self) -> RunConfig:
        if not self.config_path.is_file():
            raise ConfigError(f"'{self.location}' is not a run directory (it has no "
                              "config.yaml)")
        try:
            raw = yaml.safe_load(self.config_path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            raise ConfigError(f"'{self.config_path}' is not valid YAML") from None
        if not isinstance(raw, dict) or not raw:  # the run's own is never empty
            raise ConfigError(f"'{self.config_path}' is damaged: it holds no config")
        return parse(RunConfig, raw)

    def check_creatable(self) -> None:
        """Refuse at once a local run directory that cannot be made: the nearest folder above it
        that exists must take a new folder (tried, and removed again)."""
        if self.fs is not None:
            self._probe_remote()
            return
        why = uncreatable(self.path)
        if why:
            raise ConfigError(f"cannot create the run directory {self.location}: {why}")

    def create(self, cfg: RunConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        checkpoint.write_atomic(self.config_path,
                                yaml.safe_dump(to_dict(cfg), sort_keys=False).encode())

    # ------------------------------------------------------------ checkpoints --------------------
    def checkpoints(self, model: str) -> Path:
        return self.path / "checkpoints" / model

    def latest(self, model: str) -> tuple[bytes, dict] | None:
        return checkpoint.load_latest(self.checkpoints(model))

    def check_checkpoints(self, cfg: RunConfig) -> None:
        """Before a resume starts anything: every model's latest checkpoint must be readable and
        of the architecture the config names (CheckpointError otherwise)."""
        for name in self.models():
            saved = self.latest(name)
            if saved is None:
                continue
            if name.startswith("student-") and name[len("student-"):] in cfg.students:
                expected = cfg.students[name[len("student-"):]].model
            elif name.startswith(("generalist-", "specialist-")):
                expected = cfg.generalists.model  # specialists keep their generalist's layers
            else:
                raise CheckpointError(f"{self.checkpoints(name)} belongs to no model of this "
                                      "run's config")
            if not saved_as(ModelConfig, saved[1].get("model"), expected):
                raise CheckpointError(f"the checkpoint in {self.checkpoints(name)} was saved for "
                                      f"another architecture than {name}'s")

    def models(self) -> list[str]:
        folder = self.path / "checkpoints"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    # ------------------------------------------------------------ results ------------------------
    def write_metrics(self, models: dict[str, dict], timings: dict | None = None) -> None:
        """metrics.json: every model's results; at the end of a session also its time breakdown."""
        data = {"models": models, **({"timings": timings} if timings else {})}
        checkpoint.write_atomic(self.path / "metrics.json", json.dumps(data, indent=1).encode())

    def read_json(self, name: str) -> dict | None:
        path = self.path / name
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{self.location}: {name} is damaged (not valid JSON)") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{self.location}: {name} is damaged (not a JSON object)")
        models = (data or {}).get("models", {}) if name == "metrics.json" else {}
        if not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
            raise ConfigError(f"{self.location}: metrics.json is damaged (its models are not "
                              "records)")
        return data

    def write_json(self, name: str, data: dict) -> None:
        checkpoint.write_atomic(self.path / name, json.dumps(data, indent=1).encode())

    def write_summary(self, title: str, models: dict[str, dict], subsets: dict | None = None,
                      ensemble: dict | None = None, timings: dict | None = None) -> str:
        text = summary_table(title, models) + specialists_section(subsets, ensemble) + \
            timings_section(timings, models)
        checkpoint.write_atomic(self.path / "summary.md", text.encode())
        return text


def uncreatable(path: Path) -> str | None:
    """Why `path` cannot be made (the nearest folder above it that exists takes no new folder:
    tried, and removed again), or None."""
    parent = Path(path).absolute().parent
    while not parent.exists():
        parent = parent.parent
    try:
        probe = tempfile.mkdtemp(prefix=".ensemble-probe-", dir=parent)
    except OSError as err:
        return f"{parent} takes no new folder ({err.strerror})"
    Path(probe).rmdir()
    return None


def summary_table(title: str, models: dict[str, dict]) -> str:
    """Markdown: one row per model (parameters, errors of its best epoch by validation, time)."""
    lines = [f"# {title}", "",
             "| model | status | parameters | epochs | best epoch | val errors | test errors "
             "| test error | wall time |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in models.items():
        s = m.get("summary") or {}
        test, n_test = s.get("test_errors"), m.get("test_size")
        rate = f"{100 * test / n_test:.2f} %" if test is not None and n_test else "–"
        lines.append(
            f"| {name} | {m.get('status', '?')} | {s.get('parameters', 0):,} | "
            f"{s.get('epochs', 0)} | {s.get('best_epoch', '–')} | {_or_dash(s.get('val_errors'))} "
            f"| {_or_dash(test)} | {rate} | {s.get('wall_seconds', 0):.0f} s |")
    failed = [f"- {name}: {m['error']}" for name, m in models.items() if m.get("error")]
    if failed:
        lines += ["", "Failed:", *failed]
    return "\n".join(lines) + "\n"


def specialists_section(subsets: dict | None, ensemble: dict | None) -> str:
    """Markdown: the class subsets, their agreement with known groups, generalist vs ensemble
    errors and the paper's Table 4 view."""
    if not subsets:
        return ""
    lines = ["", f"## Specialists ({len(subsets['subsets'])})", "",
             f"Subsets from the covariance of the generalists' predictions on "
             f"{subsets['inputs']:,} {subsets['covariance_on']} inputs (no labels):", ""]
    for i, (members, names) in enumerate(zip(subsets["subsets"], subsets["names"])):
        labels = (str(c) if n == str(c) else f"{c} {n}" for c, n in zip(members, names))
        lines.append(f"- specialist-{i}: {', '.join(labels)}")
    if "agreement" in subsets:
        groups = "; ".join(f"{k}: {v}" for k, v in subsets["known_groups"].items())
        a = subsets["agreement"]
        lines += ["", f"Agreement with the known groups ({groups}): pair recall "
                      f"{a['pair_recall']:.2f}, pair precision {a['pair_precision']:.2f}."]
    if ensemble:
        lines += ["", "| | val errors | test errors |", "|---|---:|---:|",
                  f"| generalists alone | {ensemble['val']['generalist_errors']} | "
                  f"{ensemble['test']['generalist_errors']} |",
                  f"| with specialists (eq. 5, top-{ensemble.get('top_n', 1)}) | "
                  f"{ensemble['val']['ensemble_errors']} | {ensemble['test']['ensemble_errors']} |",
                  "", "Test examples by the number of specialists covering their true class "
                  "(the paper's Table 4):", "", *table4_section(ensemble)]
    return "\n".join(lines) + "\n"


def table4_section(ensemble: dict) -> list[str]:
    """Markdown rows of the paper's Table 4 from a run's ensemble.json."""
    lines = ["| specialists | examples | correct, generalists | correct, with specialists "
             "| change | relative |", "|---:|---:|---:|---:|---:|---:|"]
    for r in ensemble["table4"]:
        lines.append(f"| {r['specialists']} | {r['examples']} | {r['generalist_correct']} | "
                     f"{r['ensemble_correct']} | {r['change']:+d} | {r['relative']:+.2%} |")
    return lines


PHASES = ("ray start", "data placement", "generalists", "coordinator", "specialists",
          "combination", "soft targets", "soft targets (ensemble)", "students")


def timings_section(timings: dict | None, models: dict[str, dict]) -> str:
    """Markdown: the driver's wall time by phase (a stage runs from its first job's start to its
    last job's end, so stages overlap; they include starting their actors and the checkpoint
    writing, shown apart as well), and the actors' training and evaluating time."""
    if not timings:
        return ""
    total = timings["total"]
    lines = ["", "## Where the time went", "", "Stages overlap: each runs from its first job's "
             "start to its last job's end.", "", "| phase | seconds | share |", "|---|---:|---:|"]
    for phase in PHASES + ("checkpoint writing",):
        if phase in timings:
            label = "checkpoint writing, in the background" if phase == "checkpoint writing" \
                else phase
            lines.append(f"| {label} | {timings[phase]:.1f} | {timings[phase] / total:.0%} |")
    lines.append(f"| total | {total:.1f} | 100% |")
    epochs = [r for m in models.values() for r in m.get("history", [])]
    if epochs:
        train = sum(r["train_seconds"] for r in epochs)
        evaluate = sum(r["seconds"] - r["train_seconds"] for r in epochs)
        lines += ["", f"Inside the actors (summed over models, this session's epochs and those "
                      f"before): training {train:.1f} s, evaluating {evaluate:.1f} s."]
    return "\n".join(lines) + "\n"


def _or_dash(value) -> str:
    return "–" if value is None else str(value)
