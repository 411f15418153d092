"""Augmentation: `train.augment`'s steps, in their order, on a whole batch at once (or a
data-parallel rank's share of one, as the whole batch would have it) on the batch's device, every
random draw from the trainer's own generator (so a checkpoint's generator state resumes the same
augmented batches bit for bit).

    flip                  each image mirrored left-right with probability 1/2
    translate:P           shifted by up to P pixels each way, zeros filling in (§3's teacher: 2)
    crop:P                padded by P pixels by reflection, then a random crop back to size
                          (CIFAR's random crop with padding 4: crop:4)
    elastic:ALPHA[:SIGMA] elastic distortion (Simard, Steinkraus & Platt 2003: elastic:34:4)

Per-channel normalisation comes after every step: it is part of the model (data.normalize).
A student whose transfer set is augmented shows its teacher the same augmented batch (function
matching, Beyer et al. 2022).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ensemble.config import augment_steps


def augment(x: torch.Tensor, cfg, generator: torch.Generator | None = None,
            part: tuple[int, slice] | None = None) -> torch.Tensor:
    """A training batch x (B,C,H,W, float) through `cfg.augment`'s steps (cfg: a TrainConfig).
    `part=(n, rows)`: x holds only `rows` of a batch of n images, and gets exactly what they would
    get in the whole batch (a data-parallel rank augments its share alone): every step draws for
    all n, so the generator moves on as for the whole batch, and uses the draws of `rows`."""
    held = len(x) if part is None else len(range(part[0])[part[1]])
    if held != len(x):
        raise ValueError(f"augment: rows {part[1]} of a batch of {part[0]} hold {held} images, "
                         f"not x's {len(x)}")
    for name, args in augment_steps(cfg.augment):
        if name == "flip":
            x = flip(x, generator, part)
        elif name == "translate":
            x = shift(x, int(args[0]), generator, part=part)
        elif name == "crop":
            x = shift(x, int(args[0]), generator, padding="reflect", part=part)
        else:
            x = distort(x, args[0], args[1], generator, part)
    return x


def _of_part(draws: torch.Tensor, part: tuple[int, slice] | None) -> torch.Tensor:
    """The draws (n, ...) made for a whole batch: those of the part's rows."""
    return draws if part is None else draws[part[1]]


def flip(x: torch.Tensor, generator: torch.Generator | None = None,
         part: tuple[int, slice] | None = None) -> torch.Tensor:
    """Each image of x (B,C,H,W) mirrored left-right with probability 1/2."""
    n = part[0] if part else len(x)
    mirror = _of_part(torch.rand(n, device=x.device, generator=generator), part) < 0.5
    return torch.where(mirror[:, None, None, None], x.flip(3), x)


def shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None,
          padding: str = "constant", part: tuple[int, slice] | None = None) -> torch.Tensor:
    """Each image of x (B,C,H,W) padded by `max_shift` pixels (zeros, or `padding="reflect"`)
    and cropped back to H x W at its own random offset: a shift by (dy, dx) in
    [-max_shift, max_shift]². One gather on x's device."""
    if max_shift == 0:
        return x
    b, c, h, w = x.shape
    s, dev = max_shift, x.device
    hp, wp = h + 2 * s, w + 2 * s
    shifts = _of_part(torch.randint(-s, s + 1, (2, part[0] if part else b), device=dev,
                                    generator=generator).T, part).T  # (2, B): dy, dx
    padded = F.pad(x, (s, s, s, s), mode=padding).reshape(b, c * hp * wp)
    window = (torch.arange(c, device=dev)[:, None, None] * (hp * wp)
              + torch.arange(h, device=dev)[None, :, None] * wp
              + torch.arange(w, device=dev)[None, None, :]).reshape(1, -1)  # unshifted pixels
    offset = (s - shifts[0]) * wp + (s - shifts[1])  # (B,): where each image's window starts
    return padded.gather(1, window + offset[:, None]).view(b, c, h, w)


def distort(x: torch.Tensor, alpha: float, sigma: float, generator: torch.Generator | None = None,
            part: tuple[int, slice] | None = None):
    """Elastic distortion (Simard, Steinkraus & Platt 2003) of each image of x (B,C,H,W): every
    pixel moves along its own random displacement, uniform in [-1, 1] per axis, smoothed by a
    Gaussian of `sigma` pixels and scaled by `alpha` (their MNIST values: 34 and 4); bilinear,
    zeros outside. One pass on x's device."""
    if alpha == 0:
        return x
    b, _, h, w = x.shape
    dev = x.device

    def smoothing(n: int) -> torch.Tensor:  # (n, n): a Gaussian filter, zeros past the edges
        t = torch.arange(n, device=dev, dtype=torch.float32)
        k = torch.exp(-(t[:, None] - t[None, :]) ** 2 / (2 * sigma * sigma))
        return k / torch.exp(-torch.arange(-n + 1, n, device=dev) ** 2 / (2 * sigma * sigma)).sum()

    field = _of_part(torch.rand((part[0] if part else b, 2, h, w), device=dev,
                                generator=generator), part).mul_(2).sub_(1)
    with torch.autocast(dev.type, enabled=False):  # fp32 fields under bf16 training too
        field = smoothing(h) @ field @ smoothing(w) * alpha  # two matmuls, not a conv2d: far faster
    ys = torch.arange(h, device=dev, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, device=dev, dtype=torch.float32).view(1, 1, w)
    grid = torch.stack(((xs + field[:, 0] + 0.5) * (2 / w) - 1,   # grid_sample's x, y in [-1, 1]
                        (ys + field[:, 1] + 0.5) * (2 / h) - 1), dim=-1)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False).to(x.dtype)
