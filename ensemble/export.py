"""`ensemble export RUN --model NAME`: one trained model, ready to deploy without this project.

Writes RUN/export/<model>.onnx (torch.onnx's dynamo exporter; run it with onnxruntime) and
RUN/export/<model>.pt2 (a `torch.export` program: `torch.export.load(path).module()`), both with
a dynamic batch dimension, from the model's best weights by validation, plus <model>.json saying
what goes in and what comes out. Input: float32 images (N, C, H, W) scaled to [0, 1]; output:
logits (N, classes), softmax for probabilities.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import warnings

from ensemble.errors import ConfigError
from ensemble.rundir import RunDir

ROLES = ("generalist", "specialist", "student")
FOLDER = "export"  # RUN/export/


def choose_model(run: RunDir, wanted: str) -> str:
    """`wanted` names a model of the run, or a role: then that role's model with the fewest
    validation errors."""
    models = run.models()
    if wanted in models:
        return wanted
    if wanted not in ROLES:
        raise ConfigError(f"{run.location} has no model '{wanted}'; choose one of "
                          f"{', '.join(models) or '(none yet)'} or a role ({', '.join(ROLES)})")
    metrics = (run.read_json("metrics.json") or {}).get("models", {})
    candidates = [m for m in models if m.startswith(wanted + "-")]
    if not candidates:
        raise ConfigError(f"{run.location} has no {wanted} checkpoint (choose another with "
                          "--model)")

    def val_errors(name):
        value = ((metrics.get(name) or {}).get("summary") or {}).get("val_errors")
        return (value is None, value or 0, name)
    return min(candidates, key=val_errors)


def export(run: RunDir, wanted: str) -> list[str]:
    """Export the model `wanted` names; return the files written (relative to the run)."""
    import torch

    from ensemble.models import checkpoint_kind, load_model

    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:  # checked first: nothing is written without both
        raise ConfigError(f"the ONNX export needs {' and '.join(missing)}: "
                          "pip install -e '.[export]'")
    name = choose_model(run, wanted)
    saved = run.latest(name)
    if saved is None:
        raise ConfigError(f"{name} has no readable checkpoint in {run.location}")
    model, meta = load_model(saved[0], torch.device("cpu"))
    specialist = checkpoint_kind(meta) == "specialist"
    shape = [int(d) for d in meta["image_shape"]]
    example = torch.zeros(2, *shape)
    batch = torch.export.Dim("batch", min=1)
    folder = run.path / FOLDER
    folder.mkdir(exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()):  # the exporters' chatter
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, folder / f"{name}.pt2")
        torch.onnx.export(model, (example,), folder / f"{name}.onnx", dynamo=True,
                          dynamic_shapes=({0: batch},), input_names=["images"],
                          output_names=["logits"], external_data=False)
    classes = len(meta["members"]) + 1 if specialist else meta["classes"]
    about = {"model": name, "epoch": meta["best_epoch"], "input": "images",
             "input_shape": ["batch", *shape], "input_dtype": "float32",
             "input_scale": "pixel / 255, in [0, 1]", "output": "logits",
             "output_shape": ["batch", classes],
             "val_errors": (meta.get("summary") or {}).get("val_errors"),
             "test_errors": (meta.get("summary") or {}).get("test_errors")}
    if meta.get("normalize"):
        about["normalized_inside"] = meta["normalize"]  # per channel, applied by the model
    names = meta.get("class_names")
    about["mode"] = {1: "L", 3: "RGB"}.get(shape[0], f"{shape[0]} channels")
    if names:
        about["class_names"] = [names[c] for c in meta["members"]] + ["dustbin"] \
            if specialist else names
    if specialist:
        about["classes"] = meta["members"] + ["dustbin"]
    (folder / f"{name}.json").write_text(json.dumps(about, indent=1) + "\n")
    return [f"{FOLDER}/{name}.{ext}" for ext in ("onnx", "pt2", "json")]
