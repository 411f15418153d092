"""`ensemble run | eval | report | export | table | predict`: every mistake in the input ends
in one sentence on stderr and a non-zero exit, before any work starts and without touching an
existing run directory."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ensemble.config import GeneralistsConfig, RunConfig, SpecialistsConfig, apply_overrides, \
    load_config, parse, resume_conflicts, to_dict
from ensemble.errors import ConfigError, EnsembleError, terminated

if TYPE_CHECKING:
    from ensemble.rundir import RunDir


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one sentence, exit 2, like ours
        verb = self.prog.split()[-1]
        raise ConfigError(f"{message} (see 'ensemble{'' if verb == 'ensemble' else ' ' + verb} "
                          "--help')")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ensemble", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="train the generalists, then the students, on Ray")
    run.add_argument("config", nargs="?", help="YAML config (optional with --resume)")
    run.add_argument("--data-dir", help="ROOT of local data sets (else $ENSEMBLE_DATA, else "
                                        "/usr/share/datasets)")
    run.add_argument("--run-dir", help="where results go (default runs/<name>-<timestamp>)")
    run.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                     help="an existing Ray cluster, or 'auto' (default: $RAY_ADDRESS, which "
                          "`ray job submit` sets, else start a local Ray)")
    run.add_argument("--resume", nargs="?", const=True, metavar="RUN",
                     help="continue the run in RUN (or in --run-dir): finished models are kept")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set students.distilled.temperature=8")
    ev = sub.add_parser("eval", help="re-evaluate a run's checkpoints on its validation and "
                                     "test sets")
    ev.add_argument("run_dir")
    ev.add_argument("--data-dir")
    rep = sub.add_parser("report", help="write RUN/report.html and RUN/report.md (tables and "
                                        "figures) from a run directory")
    rep.add_argument("run_dir")
    exp = sub.add_parser("export", help="write one model as ONNX and as a torch.export program "
                                        "into RUN/export/")
    exp.add_argument("run_dir")
    exp.add_argument("--model", default="student",
                     help="a model of the run (e.g. student-distilled) or a role (generalist, "
                          "specialist, student: its model with the fewest validation errors); "
                          "default: student")
    pre = sub.add_parser("predict", help="a trained model's top classes for image files")
    pre.add_argument("run_dir", metavar="RUN")
    pre.add_argument("images", nargs="+", metavar="IMAGE",
                     help="image files, or folders of them")
    pre.add_argument("--model", default="student",
                     help="a model of the run or a role, as for export (default: student)")
    pre.add_argument("--top", type=int, default=3, help="classes shown per image (default: 3)")
    tab = sub.add_parser("table", help="the paper's tables (section 3's rows, seeds, temperature "
                                       "x width, the ensemble's gain kept, Table 4) from runs")
    tab.add_argument("run_dirs", nargs="+", metavar="RUN",
                     help="the run to analyse; runs after it on the same data lend their "
                          "students trained alike (seeds of one recipe)")
    tab.add_argument("--out", help="Markdown file, its figures beside it (default: "
                                   "RUN/table.md)")
    tab.add_argument("--data-dir")
    return parser


def _resolve_run(args) -> tuple[RunConfig, RunDir, bool, dict[str, bytes | dict]]:
    """The config, run directory and resume flag of `ensemble run`, all checked, and what is
    taken over from other runs (generalists.from_run, specialists.from_run)."""
    from ensemble.rundir import RunDir

    if args.resume:
        path = args.resume if isinstance(args.resume, str) else args.run_dir
        if not path:
            raise ConfigError("--resume needs the run directory: --resume RUN")
        if args.run_dir and isinstance(args.resume, str) and Path(args.run_dir) != Path(path):
            raise ConfigError("--resume RUN and --run-dir name different directories")
        run = RunDir(path)
        try:
            return _resumed_config(args, run), run, True, {}
        except ConfigError:
            run.close()  # a URI run directory's staging copy goes; nothing was changed
            raise
    if not args.config:
        raise ConfigError("ensemble run needs a CONFIG file (or --resume RUN)")
    cfg = load_config(args.config, args.set)
    adopted = {}
    if cfg.generalists.from_run:
        cfg, adopted = _adopt_generalists(cfg)
    if cfg.specialists.from_run:
        cfg, theirs = _adopt_specialists(cfg)
        adopted.update(theirs)
    path = args.run_dir or str(Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    run = RunDir(path)
    if run.exists():
        run.close()
        raise ConfigError(f"run directory {path} already exists; pass --resume {path} to "
                          "continue it or choose another --run-dir")
    run.check_creatable()
    return cfg, run, False, adopted


def _adopt_generalists(cfg: RunConfig) -> tuple[RunConfig, dict[str, bytes | dict]]:
    """generalists.from_run: the config with that run's generalist recipe, and the last
    checkpoint of each of its generalists; refused unless the run used this run's data split and
    every generalist finished."""
    def take(src: RunDir, saved: RunConfig) -> dict[str, bytes | dict]:
        split = lambda d: (d.name, d.folder, d.npz, d.factory, d.kwargs, d.mode,  # noqa: E731
                           d.image_size, d.val_size, d.train_size)
        if split(saved.data) != split(cfg.data):
            raise ConfigError(f"generalists.from_run: {src.location} split its data differently "
                              "(data source, val_size, train_size), so its generalists trained "
                              "on this run's validation images; use its data settings")
        return {f"generalist-{i}": _finished(src, f"generalist-{i}", saved.generalists.train.epochs,
                                             "generalists.from_run")
                for i in range(saved.generalists.count)}

    return _adopt(cfg, "generalists", GeneralistsConfig(), take)


def _adopt_specialists(cfg: RunConfig) -> tuple[RunConfig, dict[str, bytes | dict]]:
    """specialists.from_run: the config with that run's specialists recipe, and its subsets
    (subsets.json) and the last checkpoint of each specialist; refused unless that run took its
    generalists from where this one takes them and every specialist finished."""
    def take(src: RunDir, saved: RunConfig) -> dict[str, bytes | dict]:
        if saved.generalists.from_run != cfg.generalists.from_run:
            raise ConfigError(f"specialists.from_run: {src.location} took its generalists from "
                              f"{saved.generalists.from_run or 'none (it trained its own)'}, this "
                              f"run from {cfg.generalists.from_run}: its specialists start from "
                              "and combine with theirs")
        report = src.read_json("subsets.json")
        if not saved.specialists.k or report is None:
            raise ConfigError(f"specialists.from_run: {src.location} has no specialists "
                              "(specialists.k 0, or its coordinator has not run)")
        return {"subsets.json": report, **{
            f"specialist-{i}": _finished(src, f"specialist-{i}", saved.specialists.train.epochs,
                                         "specialists.from_run")
            for i in range(len(report["subsets"]))}}

    return _adopt(cfg, "specialists", SpecialistsConfig(), take)


def _adopt(cfg: RunConfig, section: str, default,
           take) -> tuple[RunConfig, dict[str, bytes | dict]]:
    """`section.from_run`: that run's section as it was trained, in place of this config's, and
    what `take(run, its config)` copies from it (checkpoints; reports as dicts); refused when
    there is no such run or this section holds anything beside from_run."""
    from ensemble.rundir import RunDir

    source = getattr(cfg, section).from_run
    src = RunDir(source)
    try:
        if not src.exists():
            raise ConfigError(f"{section}.from_run: there is no run at {source}")
        saved = src.load_config()
        own = dataclasses.replace(getattr(cfg, section), from_run="")
        theirs = dataclasses.replace(getattr(saved, section), from_run="")
        if own not in (default, theirs):
            raise ConfigError(f"{section}.from_run takes the {section} of {source} as they were "
                              f"trained; leave out the rest of the {section} section")
        adopted = take(src, saved)
    finally:
        src.close()
    return dataclasses.replace(cfg, **{section: dataclasses.replace(theirs, from_run=source)}), \
        adopted


def _finished(src: RunDir, name: str, epochs: int, key: str) -> bytes:
    """The last checkpoint of `name` in `src`, refused unless it trained every epoch or stopped
    early (train.patience)."""
    latest = src.latest(name)
    done = latest[1].get("epoch", 0) if latest else 0
    stopped = bool(latest and latest[1]["history"] and latest[1]["history"][-1].get("stopped"))
    if done < epochs and not stopped:
        raise ConfigError(f"{key}: {name} of {src.location} has trained {done} of its {epochs} "
                          f"epochs; finish it first with 'ensemble run --resume {src.location}'")
    return latest[0]


def _resumed_config(args, run: RunDir) -> RunConfig:
    """The config to resume `run` with: its own, or CONFIG, with --set applied; refused if it
    changes anything but an epoch count or a bound on waiting."""
    saved = run.load_config()
    if args.config:
        cfg = load_config(args.config, args.set)
    else:
        cfg = parse(RunConfig, apply_overrides(to_dict(saved), args.set))
    if cfg.generalists.from_run and cfg.generalists.from_run == saved.generalists.from_run:
        cfg = dataclasses.replace(cfg, generalists=saved.generalists)  # as taken over
    if cfg.specialists.from_run and cfg.specialists.from_run == saved.specialists.from_run:
        cfg = dataclasses.replace(cfg, specialists=saved.specialists)
    changed = resume_conflicts(saved, cfg)
    if changed:
        raise ConfigError(f"cannot resume {run.location} with a changed config "
                          f"({', '.join(changed)} differ); only raising an epoch count is allowed")
    return cfg


def cmd_run(args) -> int:

    cfg, run, resume, adopted = _resolve_run(args)
    try:
        return _run(args, cfg, run, resume, adopted)
    finally:
        run.close()  # a URI run directory: the last sync, and its staging copy removed


def _run(args, cfg: RunConfig, run: RunDir, resume: bool,
         adopted: dict[str, bytes | dict]) -> int:
    from ensemble.data import load_splits
    from ensemble.tracking import Tracker

    splits = load_splits(cfg.data, args.data_dir)  # before anything is started or written
    cfg.check_classes(splits.num_classes)  # data of one's own: its classes are known only now
    if not resume:
        cfg.check_subsets(splits.num_classes)
    _check_models(cfg, splits)
    spec = cfg.specialists
    if spec.k and spec.covariance_on == "val" and len(splits.val_y) == 0:
        raise ConfigError("specialists.covariance_on is 'val' but data.val_size leaves no "
                          "validation images to cluster on; give data.val_size or set "
                          "specialists.covariance_on to 'transfer'")
    if args.address:
        _check_reachable(args.address)
    if cfg.generalists.weights and not resume:
        adopted = _generalists_from_weights(cfg, splits)
    if resume:
        run.check_checkpoints(cfg)
    if not args.address:
        # Ray replaces a loopback node address with the routable one, so a local Ray would
        # listen on every interface; as on macOS and Windows, this keeps it on 127.0.0.1. It
        # must be set before Ray is imported, and the processes Ray starts inherit it.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ensemble.pipeline import model_requests, run_pipeline  # imports Ray: only now
    import ray

    if not args.address and not ray.is_initialized():  # a local Ray: asked before it starts
        from ensemble.actors import check_resources, local_node

        node = local_node()
        if node is not None:
            check_resources(model_requests(cfg), cfg.autoscaler.node_types, [node])

    path = run.location
    tracker = Tracker(run.path / "tb")
    train = f"training streamed from {cfg.data.stream}" if cfg.data.stream else \
        f"{len(splits.train_y):,} training"
    tracker.line(f"run {path} ({'resumed' if resume else 'new'}): {train}, "
                 f"{len(splits.val_y):,} validation, {len(splits.test_y):,} test images of "
                 f"{splits.name}")
    try:
        run_pipeline(cfg, run, splits, args.address, resume, tracker, adopted)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (ensemble.errors.Terminated)
        how, code = ("terminated", 143) if terminated() else ("interrupted", 130)
        print(f"{how}; continue with: ensemble run --resume {path}", file=sys.stderr)
        return code
    finally:
        tracker.close()
    return 0


def _check_reachable(address: str) -> None:
    """Refuse at once a HOST:PORT where nothing listens: ray.init would retry it for minutes
    (`auto`, `ray://` and other forms are left to Ray)."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as err:
        raise ConfigError(f"nothing answers at --address {address} ({err.strerror or err}); "
                          "start Ray there (ray start --head) or leave --address out for a "
                          "local Ray") from None


def _check_models(cfg: RunConfig, splits) -> None:
    """Every model of the run built once and run on one image of the data (specialists are
    their generalists with another head): one sentence naming the key if one cannot be."""
    from ensemble.models import check_model

    models = [("generalists.model", cfg.generalists.model)]
    models += [(f"students.{name}.model", s.model) for name, s in cfg.students.items()]
    for key, model in models:
        check_model(model, key, splits.image_shape, splits.num_classes)
    if cfg.data.stream:
        return
    from ensemble.data import transfer_mask

    for name, s in cfg.students.items():  # a filter the data leave nothing of
        if not transfer_mask(splits.train_y, s.drop_classes, s.keep_classes,
                             s.transfer_size).any():
            raise ConfigError(f"students.{name}: its transfer set is empty: the training "
                              "split holds no image of the classes it keeps")


def _generalists_from_weights(cfg: RunConfig, splits) -> dict[str, bytes]:
    """generalists.weights: each file's state dict as a finished generalist, evaluated."""
    from ensemble.checkpoint import read_state_dict
    from ensemble.train import Trainer

    blobs = {}
    for i, location in enumerate(cfg.generalists.weights):
        key = f"generalists.weights[{i}]"
        try:
            state = read_state_dict(location)
        except ConfigError as err:
            raise ConfigError(f"{key}: {err}") from None
        trainer = Trainer(f"generalist-{i}", cfg.generalists.model, cfg.generalists.train,
                          splits, cfg.seed + i)
        try:
            trainer.adopt(state, location)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[-1].strip()[:200]
            raise ConfigError(f"{key}: {location} does not fit generalists.model ({first})") \
                from None
        blobs[trainer.name] = trainer.checkpoint()
    return blobs


def cmd_eval(args) -> int:
    from ensemble.rundir import RunDir

    run = RunDir(args.run_dir)
    try:
        return _eval(args, run)
    finally:
        run.close()


def _eval(args, run: RunDir) -> int:
    import torch

    from ensemble.data import labels_to_device, load_splits, to_device
    from ensemble.models import checkpoint_kind, load_model
    from ensemble.train import count_errors, pick_device

    cfg = run.load_config()
    splits = load_splits(cfg.data, args.data_dir)
    device = pick_device(cfg.device)
    val = to_device(splits.val_x, device), labels_to_device(splits.val_y, device)
    test = to_device(splits.test_x, device), labels_to_device(splits.test_y, device)
    models = run.models()
    if not models:
        raise ConfigError(f"{args.run_dir} holds no checkpoints to evaluate")
    print("| model | epoch | val errors | test errors | test error |\n|---|---:|---:|---:|---:|")
    for name in models:
        saved = run.latest(name)
        if saved is None:
            continue
        model, meta = load_model(saved[0], device)
        mine = lambda y: y  # noqa: E731
        if checkpoint_kind(meta) == "specialist":  # its subset's classes and a dustbin
            from specialists.specialist import local_labels

            members = torch.tensor(meta["members"], device=device)
            mine = lambda y: local_labels(y, members, meta["generalist_classes"])  # noqa: E731
        val_errors = count_errors(model, val[0], mine(val[1]))
        test_errors = count_errors(model, test[0], mine(test[1]))
        print(f"| {name} | {meta['best_epoch']} | {val_errors} | {test_errors} | "
              f"{100 * test_errors / max(1, len(splits.test_y)):.2f} % |")
    specialists = [m for m in models if m.startswith("specialist-")]
    if specialists:
        from ensemble.teacher import evaluate_ensemble

        blobs = lambda names: [run.latest(n)[0] for n in names]  # noqa: E731
        generalists = [m for m in models if m.startswith("generalist-")]
        result = evaluate_ensemble(blobs(generalists), blobs(specialists), cfg.specialists,
                                   splits, cfg.device)
        for who, key in (("generalists alone", "generalist_errors"),
                         ("generalists + specialists", "ensemble_errors")):
            print(f"| {who} | | {result['val'][key]} | {result['test'][key]} | "
                  f"{100 * result['test'][key] / max(1, len(splits.test_y)):.2f} % |")
    return 0


def _existing_run(location: str) -> RunDir:
    from ensemble.rundir import RunDir

    run = RunDir(location)
    if not run.config_path.is_file():
        run.close()
        raise ConfigError(f"'{location}' is not a run directory (it has no config.yaml)")
    return run


def cmd_report(args) -> int:
    from ensemble import report

    run = _existing_run(args.run_dir)
    try:
        files = report.write(run)
    finally:
        run.close()
    print(f"wrote {', '.join(files[:2])} and {len(files) - 2} figure(s) in {run.location}")
    return 0


def cmd_export(args) -> int:
    from ensemble import export

    run = _existing_run(args.run_dir)
    try:
        files = export.export(run, args.model)
    finally:
        run.close()
    print(f"wrote {', '.join(files)} in {run.location}")
    return 0


def cmd_predict(args) -> int:
    from ensemble.predict import predict

    if args.top < 1:
        raise ConfigError(f"--top must be at least 1, got {args.top}")
    run = _existing_run(args.run_dir)
    try:
        print("\n".join(predict(run, args.model, args.images, args.top)))
    finally:
        run.close()
    return 0


def cmd_table(args) -> int:
    from ensemble import analysis

    runs = []
    try:
        for location in args.run_dirs:
            runs.append(_existing_run(location))
        out = Path(args.out) if args.out else runs[0].path / "table.md"
        print(analysis.tables(runs, out, args.data_dir), end="")
    finally:
        for run in runs:
            run.close()  # a URI run directory gets its table.md here
    where = args.out or f"{runs[0].location.rstrip('/')}/table.md"
    print(f"wrote {where} and its figures")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return {"run": cmd_run, "eval": cmd_eval, "report": cmd_report,
                "export": cmd_export, "table": cmd_table,
                "predict": cmd_predict}[args.command](args)
    except EnsembleError as err:
        print(f"ensemble: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
