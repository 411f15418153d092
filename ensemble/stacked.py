"""Many small students of one shape trained at once, as one stacked model.

A temperature x width sweep trains many students that differ only in their seed, temperature and
soft-target weight. Trained one by one, each small step is mostly overhead; stacked, the N
members' weights share a leading dimension and every layer of every member is one batched
matmul (`torch.baddbmm`) per step, forward and backward.

The members stay ordinary `Student`s: each draws its own batch order from its own generator,
keeps its own optimiser state, evaluates itself, tracks its own best epoch and writes a plain
student checkpoint. Only the steps are shared: each epoch the members' weights and momentum are
stacked, trained, and written back. Per member the arithmetic is that of training it alone, up
to the summation order inside the batched matmuls (tests/test_stacked.py states the tolerance).
The loss is distill.distillation_loss on the stacked shapes. The forward pass is not the
model's own under torch.func.vmap(functional_call): that keeps each weight as (N, out, in), and
in a one-off check here (8 students of 784-300-300-10, batch 100, one thread) a step took
clearly longer than with these (N, in, out) matmuls, giving back much of what stacking gains.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ensemble.config import StudentConfig, to_dict
from ensemble.distill import Student, distillation_loss
from ensemble.data import Splits, as_float
from ensemble.errors import ConfigError
from ensemble.train import EVAL_BATCH, optimizer


def why_not_stackable(cfgs: Sequence[StudentConfig]) -> str | None:
    """Why these students cannot train as one stacked model, or None if they can: the same
    MLP without dropout, the same training recipe without augmentation, the same transfer set."""
    first = cfgs[0]
    for cfg in cfgs:
        if cfg.model.kind != "mlp" or cfg.model.factory or cfg.model.dropout_in or \
                cfg.model.dropout_hidden:
            return "stacked students must be MLPs without dropout"
        if cfg.train.augment:
            return "stacked students must train without augmentation (train.augment)"
        if cfg.train.patience:
            return "stacked students must train without early stopping (train.patience)"
        if cfg.resources.workers > 1:
            return "a student trained over several workers is not stacked"
        if (cfg.train.optimizer, cfg.train.decay, cfg.train.label_smoothing) != ("sgd", "all", 0):
            return "stacked students must use SGD, decay on all parameters, no label smoothing"
        if to_dict(cfg.model) != to_dict(first.model):
            return "stacked students must share one model shape"
        if to_dict(cfg.train) != to_dict(first.train):
            return "stacked students must share one training recipe (train.*)"
        if (cfg.drop_classes, cfg.keep_classes, cfg.transfer_size) != \
                (first.drop_classes, first.keep_classes, first.transfer_size):
            return "stacked students must share one transfer set"
        if cfg.uses_teacher and cfg.soft_targets != first.soft_targets:
            return "stacked students must share one teacher"
    return None


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


class StackedStudents:
    """Trains the students `names`/`cfgs` (seeds `seeds`) as one stacked model."""

    def __init__(self, names: Sequence[str], cfgs: Sequence[StudentConfig], data: Splits,
                 teachers: Sequence[bytes], seeds: Sequence[int], threads: int = 1,
                 device: str = "auto", specialists: Sequence[bytes] = (), specialists_cfg=None,
                 outputs: torch.Tensor | None = None):
        why = why_not_stackable(cfgs)
        if why:
            raise ConfigError(why)
        self.members = [Student(name, cfg, data, teachers if cfg.uses_teacher else [], seed,
                                threads, device, specialists, specialists_cfg, outputs)
                        for name, cfg, seed in zip(names, cfgs, seeds)]
        lead = self.members[0]
        for member in self.members[1:]:  # one transfer set: one copy of the images
            member.x, member.val, member.test = lead.x, lead.val, lead.test
        self.device, self.cfg, self.model_cfg = lead.device, lead.cfg, lead.model_cfg
        self.temperature = torch.tensor([m.temperature for m in self.members],
                                        device=self.device)
        self.alpha = torch.tensor([m.alpha if m.targets is not None else 0.0
                                   for m in self.members], device=self.device)
        classes = lead.classes
        self.targets = torch.stack([  # (N, n, C): each member's soft targets at its own T
            m.targets if m.targets is not None else torch.zeros(len(m.x), classes,
                                                                device=self.device)
            for m in self.members])

    def run_epoch(self, epoch: int, lasts: Sequence[bytes | None] | None = None,
                  keep: bool = True):
        """Train every member's 1-based `epoch`; (their metrics, their checkpoints or None
        unless `keep`), or (None, None) if a member is not at `epoch - 1` and `lasts` gives no
        checkpoints (as Trainer.run_epoch)."""
        if lasts is None and any(m.epoch != epoch - 1 for m in self.members):
            return None, None
        for member, last in zip(self.members, lasts or [None] * len(self.members)):
            member.ready_for(epoch, last)
        records = self.train_epoch()
        return records, [m.checkpoint() for m in self.members] if keep else None

    def train_epoch(self) -> list[dict]:
        members = self.members
        lr = [m.begin_epoch() for m in members][0]  # one recipe: one learning rate
        start = time.perf_counter()
        orders = [list(m.epoch_batches()) for m in members]  # each member's own batch order
        layers = [linears(m.model) for m in members]
        # (N, in, out) per layer, stored that way: batched matmuls on transposed views of
        # (N, out, in) ran markedly slower here
        weights = [torch.stack([ls[i].weight.detach().t() for ls in layers]).contiguous()
                   .requires_grad_() for i in range(len(layers[0]))]
        biases = [torch.stack([ls[i].bias.detach() for ls in layers]).requires_grad_()
                  for i in range(len(layers[0]))]  # (N, out)
        params = [p for pair in zip(weights, biases) for p in pair]
        opt = optimizer(params, self.cfg, lr)
        own = [[p for layer in ls for p in (layer.weight, layer.bias)] for ls in layers]
        if all(m.opt.state.get(own[k][0]) for k, m in enumerate(members)):
            for j, p in enumerate(params):  # the momentum each member had
                opt.state[p]["momentum_buffer"] = torch.stack(
                    [_as_stacked(m.opt.state[own[k][j]]["momentum_buffer"])
                     for k, m in enumerate(members)]).contiguous()
        x, y = members[0].x.flatten(1), members[0].y  # (n, D), (n,): shared by the members
        rows = torch.arange(len(members), device=self.device)[:, None]
        total = torch.zeros(len(members), device=self.device)
        n = 0
        for step in range(len(orders[0])):
            idx = torch.stack([order[step] for order in orders])  # (N, B)
            h = as_float(x[idx])  # (N, B, D)
            with members[0].autocast():
                for i, (w, b) in enumerate(zip(weights, biases)):
                    h = torch.baddbmm(b.unsqueeze(1), h, w)
                    if i < len(weights) - 1:
                        h = F.relu(h)
            losses = distillation_loss(h.float(), self.targets[rows, idx], y[idx],
                                       self.temperature, self.alpha)  # (N,)
            opt.zero_grad(set_to_none=True)
            losses.sum().backward()  # the members' parameters are apart: each its own gradient
            opt.step()
            if self.model_cfg.max_norm > 0:
                with torch.no_grad():  # each unit's incoming weights: a column here
                    limit = self.model_cfg.max_norm
                    for w in weights:
                        norms = w.norm(dim=1, keepdim=True)
                        w.mul_(torch.where(norms > limit, limit / (norms + 1e-7), 1.0))
            total += losses.detach() * idx.shape[1]
            n += idx.shape[1]
        with torch.no_grad():  # back into each member, weights and momentum
            for k, member in enumerate(members):
                for j, p in enumerate(own[k]):
                    p.copy_(_as_stacked(params[j][k]))
                    buf = opt.state.get(params[j], {}).get("momentum_buffer")
                    if buf is not None:
                        member.opt.state[p]["momentum_buffer"] = _as_stacked(buf[k]).clone()
        with torch.no_grad(), members[0].autocast():  # every member on the same images at once
            val, test = (self._predict(weights, biases, part[0]) for part in
                         (members[0].val, members[0].test))
        records = []
        for k, member in enumerate(members):
            member._restore_rng()  # its own RNG state is the one it keeps
            records.append(member.end_epoch(lr, total[k], n, start, (val[k], test[k])))
        return records

    @staticmethod
    def _predict(weights, biases, images: torch.Tensor) -> torch.Tensor:
        """Every member's predicted classes (N, n) for `images` (n, ...), in chunks. The members
        share the images, so their first layers are one matmul."""
        members, inputs, width = weights[0].shape
        first = weights[0].permute(1, 0, 2).reshape(inputs, members * width)  # (D, N * out)
        out = []
        for i in range(0, len(images), EVAL_BATCH):
            x = as_float(images[i:i + EVAL_BATCH]).flatten(1)  # (b, D)
            h = (x @ first).view(len(x), members, width).transpose(0, 1) + biases[0].unsqueeze(1)
            for w, b in zip(weights[1:], biases[1:]):
                h = torch.baddbmm(b.unsqueeze(1), F.relu(h), w)
            out.append(h.argmax(2))
        return torch.cat(out, 1) if out else torch.zeros(members, 0, dtype=torch.long)


def _as_stacked(t: torch.Tensor) -> torch.Tensor:
    """A weight matrix between a member's (out, in) and the stack's (in, out) layout, either way;
    a bias as it is."""
    return t.t() if t.dim() == 2 else t
