"""§5.1 of the paper: a specialist sees its subset of classes plus one dustbin class.

- Labels: class c of the subset becomes its position in the subset; every other class becomes
  the dustbin (the last output).
- Head (the output layer): initialised from the generalist's rows for the subset; the dustbin
  row from the rest (their mean, and log(|rest|) added to the bias, which is the log-sum-exp
  of the rest's logits when they are equal).
- Batches: a fraction f from the subset, the rest drawn uniformly from all other examples, i.e.
  in their natural proportions.
- Correction: training on share f of subset examples when the data hold share pi shifts the
  dustbin's log-odds by log[(1-f)/f] - log[(1-pi)/pi]; adding log[f(1-pi) / (pi(1-f))] to the
  dustbin logit undoes it. (The paper's log(f/pi) forgets that the dustbin was undersampled.)
- Soft targets (§6, optional): the generalist's logits collapsed the same way (the dustbin's,
  the log-sum-exp of the rest's), moved to the sampled prior (the correction taken off), then
  softened at T: so hard and soft terms aim at the same prior, which the correction undoes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def local_labels(labels: torch.Tensor, members: torch.Tensor, classes: int) -> torch.Tensor:
    """labels (N,) over all classes -> (N,) in [0, K]: position in the subset, or K (dustbin)."""
    lut = torch.full((classes,), len(members), dtype=torch.long, device=labels.device)
    lut[members.to(labels.device)] = torch.arange(len(members), device=labels.device)
    return lut[labels]


class DustbinHead(nn.Linear):
    """A specialist's head: its subset's classes and a dustbin (the last output). In eval mode the
    dustbin logit gets the sampling correction (training sees the biased batches)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features)
        self.register_buffer("dustbin_offset", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        if self.training:
            return logits
        shift = torch.zeros(logits.shape[-1], device=logits.device, dtype=logits.dtype)
        shift[-1] = self.dustbin_offset
        return logits + shift


@torch.no_grad()
def init_from_generalist(head: DustbinHead, output: nn.Linear, members: torch.Tensor) -> None:
    """Set a specialist's head from its generalist's: the subset's rows as they were, the
    dustbin's from the rest."""
    classes = output.out_features
    rest = torch.ones(classes, dtype=torch.bool)
    rest[members] = False
    head.weight[:-1] = output.weight[members]
    head.bias[:-1] = output.bias[members]
    head.weight[-1] = output.weight[rest].mean(0)
    head.bias[-1] = output.bias[rest].mean() + math.log(int(rest.sum()))


def draw_batch(inside: torch.Tensor, outside: torch.Tensor, batch: int, fraction: float,
               generator: torch.Generator) -> torch.Tensor:
    """Indices of one batch: round(fraction * batch) drawn from `inside` (the subset's examples),
    the rest uniformly from `outside` (all others, so in natural proportions); with replacement."""
    n_in = min(batch, max(0, round(fraction * batch)))
    if len(outside) == 0:
        n_in = batch
    if len(inside) == 0:
        n_in = 0
    dev = inside.device
    pick_in = torch.randint(len(inside), (n_in,), generator=generator, device=dev) if n_in else \
        torch.empty(0, dtype=torch.long, device=dev)
    pick_out = torch.randint(len(outside), (batch - n_in,), generator=generator, device=dev) \
        if batch > n_in else torch.empty(0, dtype=torch.long, device=dev)
    return torch.cat([inside[pick_in], outside[pick_out]])


def dustbin_offset(fraction: float, natural: float) -> float:
    """log[f (1 - pi) / (pi (1 - f))]: add to the dustbin logit after training on share f of
    subset examples when the natural share is pi."""
    if not (0 < fraction < 1 and 0 < natural < 1):
        raise ValueError(f"shares must lie in (0, 1), got f={fraction}, pi={natural}")
    return math.log(fraction * (1 - natural) / (natural * (1 - fraction)))


def collapsed_soft_targets(logits: torch.Tensor, members: torch.Tensor, rest: torch.Tensor,
                           temperature: float, offset: float | torch.Tensor) -> torch.Tensor:
    """A generalist's soft targets for a specialist: logits (B, C) over all classes -> (B, K + 1)
    probabilities at `temperature` over the subset (`members`, K indices) and the dustbin, whose
    logit is the log-sum-exp of the `rest`'s ((C,) bool) less `offset` (dustbin_offset: from the
    data's prior to the batches' enriched one). Collapsed before softening: the dustbin is one
    class, not the sum of hundreds of softened ones."""
    dustbin = torch.logsumexp(logits[:, rest], 1, keepdim=True) - offset
    return F.softmax(torch.cat([logits[:, members], dustbin], 1) / temperature, 1)
