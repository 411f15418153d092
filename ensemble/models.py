"""Models from a `ModelConfig`: the paper's MLPs, a small CNN for 32x32 colour images, the CIFAR
nets of the distillation literature (ensemble.zoo), or any nn.Module a factory returns.

Every model's classifier is one Linear layer to the classes, its head: the config's `head`, else
the last Linear in `named_modules()` order. A specialist is its generalist with the head
replaced by one over its subset plus a dustbin, so models know nothing of specialists.
"""
from __future__ import annotations

import importlib
import os

import torch
from torch import nn

from ensemble import checkpoint
from ensemble.config import ModelConfig, parse
from ensemble.errors import CheckpointError, ConfigError
from ensemble.zoo import ZOO
from specialists.specialist import DustbinHead


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


class Normalized(nn.Module):
    """A model that takes pixels / 255 and normalises them per channel itself, so that its
    checkpoints and exports carry what it needs (data.normalize)."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def normalized(model: nn.Module, mean, std) -> nn.Module:
    """`model` behind the normalisation (mean, std per channel), or as it is for None."""
    return model if mean is None else Normalized(model, mean, std)


def build_model(cfg: ModelConfig, image_shape: tuple[int, int, int], classes: int) -> nn.Module:
    """The model `cfg` names, for images of `image_shape` (C,H,W) and `classes` outputs (a
    factory's model has the outputs its kwargs give it: `check_model` compares them)."""
    c, h, w = image_shape
    if cfg.factory:
        return factory(cfg.factory)(**cfg.kwargs)
    if cfg.kind == "mlp":
        return MLP(c * h * w, cfg.hidden, classes, cfg.dropout_in, cfg.dropout_hidden)
    if cfg.kind in ZOO:
        return ZOO[cfg.kind](c, classes)
    return SmallCNN(c, cfg.hidden, classes, cfg.dropout_in, cfg.dropout_hidden)


def factory(path: str):
    """The callable "package.module:callable" names (ConfigError if it cannot be imported)."""
    module, _, name = path.partition(":")
    try:
        found = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot import {path} ({err})") from None
    if not callable(found):
        raise ConfigError(f"{path} is not callable")
    return found


def head_of(model: nn.Module, name: str = "") -> tuple[str, nn.Linear]:
    """(name, module) of the model's classifier: the module `name`, else the last Linear."""
    modules = dict(model.named_modules())
    if name and isinstance(model, Normalized):
        name = f"net.{name}"  # the config names it inside the factory's model
    if not name:
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        if not linears:
            raise ConfigError("has no nn.Linear to serve as its classifier (its head)")
        name = linears[-1]
    if not isinstance(modules.get(name), nn.Linear):
        raise ConfigError(f"has no nn.Linear named '{name}' (its head)")
    return name, modules[name]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def specialist_model(base: nn.Module, cfg: ModelConfig, members: int) -> nn.Module:
    """`base` with its head replaced by an empty one over `members` classes plus a dustbin."""
    name, head = head_of(base, cfg.head)
    replace_module(base, name, DustbinHead(head.in_features, members + 1))
    return base


def check_model(cfg: ModelConfig, key: str, image_shape: tuple[int, int, int],
                classes: int) -> None:
    """Refuse, in one sentence naming `key`, a model that cannot be built or does not fit the
    data: its size against this machine's memory (the driver builds it, and every actor holds
    it several times over), its head's outputs, and one forward pass in eval mode on one image."""
    _check_size(cfg, key, image_shape, classes)
    try:
        model = build_model(cfg, image_shape, classes)
    except ConfigError as err:
        raise ConfigError(f"{key}.factory: {err}") from None
    except Exception as err:
        raise ConfigError(f"{key}: building the model failed: {_first_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{key}.factory: {cfg.factory} returned a {type(model).__name__}, "
                          "not an nn.Module")
    try:
        _, head = head_of(model, cfg.head)
    except ConfigError as err:
        raise ConfigError(f"{key}: the model {err}") from None
    if head.out_features != classes:
        raise ConfigError(f"{key}: the model's head has {head.out_features} outputs but the data "
                          f"have {classes} classes")
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, *image_shape))
    except Exception as err:
        raise ConfigError(f"{key}: the model fails on one {'x'.join(map(str, image_shape))} "
                          f"image: {_first_line(err)}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, classes):
        raise ConfigError(f"{key}: the model's output for one image is "
                          f"{tuple(getattr(out, 'shape', ())) or type(out).__name__}, not "
                          f"(1, {classes}) logits")


def _check_size(cfg: ModelConfig, key: str, image_shape: tuple[int, int, int],
                classes: int) -> None:
    """Refuse a model whose weights alone exceed this machine's memory, counted on the meta
    device (nothing allocated); a factory that cannot build there is left to the real build."""
    try:
        with torch.device("meta"):
            model = build_model(cfg, image_shape, classes)
        size = sum(t.numel() * t.element_size()
                   for t in [*model.parameters(), *model.buffers()])
        count = count_parameters(model)
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except Exception:  # no meta build, or no sysconf (Windows): the real build will tell
        return
    if size > memory:
        raise ConfigError(f"{key}: the model has {count:,} parameters, {size / 1e9:,.0f} GB of "
                          f"weights, more than this machine's {memory / 1e9:,.0f} GB of memory")


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


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
    the checkpoint's metadata. A specialist is its generalist with its own head (its subset's
    classes and a dustbin)."""
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
    if meta.get("normalize"):
        model = normalized(model, meta["normalize"]["mean"], meta["normalize"]["std"])
    weights = state.best if which == "best" else state.model
    if checkpoint_kind(meta) == "specialist":
        model = specialist_model(model, cfg, len(meta["members"]))
        if "dustbin_offset" in weights:  # written before the offset moved into the head
            name, _ = head_of(model, cfg.head)
            weights[f"{name}.dustbin_offset"] = weights.pop("dustbin_offset")
    model = model.to(device)
    try:
        model.load_state_dict(weights)
    except RuntimeError:
        raise CheckpointError(f"checkpoint of '{meta.get('name')}' does not fit its own model "
                              "description") from None
    return model.eval(), meta
