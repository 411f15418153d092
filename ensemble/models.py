"""The paper's MLPs and a small CNN for 32x32 colour images, built from a `ModelConfig`.

Every model is `features` (input -> last hidden layer) followed by `output` (one Linear layer to
the classes), so a specialist can swap the output layer for its own classes plus a dustbin.
"""
from __future__ import annotations

import torch
from torch import nn

from ensemble import checkpoint
from ensemble.config import ModelConfig, parse
from ensemble.errors import CheckpointError
from specialists.specialist import SpecialistNet


class MLP(nn.Module):
    """Flatten -> [dropout -> Linear -> ReLU] per hidden layer -> dropout -> Linear (§3's nets)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], classes: int,
                 dropout_in: float = 0.0, dropout_hidden: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_dim
        for i, h in enumerate(hidden):
            p = dropout_in if i == 0 else dropout_hidden
            if p > 0:
                layers.append(nn.Dropout(p))
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        if dropout_hidden > 0:
            layers.append(nn.Dropout(dropout_hidden))
        self.features = nn.Sequential(*layers)
        self.output = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(x))


class SmallCNN(nn.Module):
    """[conv3x3 -> batch norm -> ReLU -> 2x2 max-pool] per width -> global average -> Linear."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], classes: int,
                 dropout_in: float = 0.0, dropout_hidden: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout_in)] if dropout_in > 0 else []
        channels = in_channels
        for w in widths:
            layers += [nn.Conv2d(channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(), nn.MaxPool2d(2)]
            channels = w
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if dropout_hidden > 0:
            layers.append(nn.Dropout(dropout_hidden))
        self.features = nn.Sequential(*layers)
        self.output = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.features(x))


def build_model(cfg: ModelConfig, image_shape: tuple[int, int, int], classes: int) -> nn.Module:
    """The model `cfg` names, for images of `image_shape` (C,H,W) and `classes` outputs."""
    c, h, w = image_shape
    if cfg.kind == "mlp":
        return MLP(c * h * w, cfg.hidden, classes, cfg.dropout_in, cfg.dropout_hidden)
    return SmallCNN(c, cfg.hidden, classes, cfg.dropout_in, cfg.dropout_hidden)


@torch.no_grad()
def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """Rescale each unit's incoming weight vector to L2 norm <= max_norm (Hinton et al. 2012)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.renorm_(2, 0, max_norm)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def checkpoint_kind(meta: dict) -> str:
    """What a checkpoint's model is: 'generalist', 'specialist' or 'student' (written by its
    trainer); a checkpoint from before kinds were written is a specialist if it names members."""
    return meta.get("kind") or ("specialist" if "members" in meta else "generalist")


def load_model(blob: bytes, device: torch.device, which: str = "best") -> tuple[nn.Module, dict]:
    """The model a checkpoint holds (its best weights by default) on `device`, in eval mode, and
    the checkpoint's metadata. A specialist is its generalist's features with its own output
    layer (its subset's classes and a dustbin)."""
    state = checkpoint.loads_state(blob)
    meta = state.meta
    try:
        cfg = parse(ModelConfig, meta["model"], "model")
        image_shape = tuple(int(d) for d in meta["image_shape"])
        classes = int(meta.get("generalist_classes", meta["classes"]))
    except Exception:
        raise CheckpointError(f"checkpoint of '{meta.get('name')}' has no valid model "
                              "description") from None
    model = build_model(cfg, image_shape, classes)
    if checkpoint_kind(meta) == "specialist":
        model = SpecialistNet(model.features, nn.Linear(model.output.in_features,
                                                        len(meta["members"]) + 1))
    model = model.to(device)
    try:
        model.load_state_dict(state.best if which == "best" else state.model)
    except RuntimeError:
        raise CheckpointError(f"checkpoint of '{meta.get('name')}' does not fit its own model "
                              "description") from None
    return model.eval(), meta
