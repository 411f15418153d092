"""Eq. 5 of the paper: combine the generalist with the specialists active for each input.

For each input find the distribution q = softmax(z) over all C classes minimising

    KL(p_g || q) + sum over active specialists m of KL(p_m || q_m),

where q_m is q seen by specialist m: q_c for each class c of its subset S_m, and the sum of q over
the classes outside S_m for its dustbin. Up to constants this is the cross-entropy

    L(q) = -sum_c w_c log q_c - sum_m d_m log R_m(q),   R_m(q) = sum_{c not in S_m} q_c,

with w = p_g + sum_m p_m (each specialist's subset probabilities placed at their classes) and d_m
the dustbin probabilities. L is convex in q. Its gradient with respect to the logits z is

    g = (1 + n) q - w - q * sum_m d_m (1 - S_m) / R_m        (n = active specialists),

and the solver steps q against it, q <- q - g / (1 + n): the step keeps q on the simplex, never
increases L (it is the EM fixed-point iteration for this problem), and stops when q moves less
than `tol` or after `max_steps`. Everything is batched over inputs and specialists on the device.
"""
from __future__ import annotations

import torch

EPS = 1e-12  # keeps logs and ratios finite where a probability underflows to 0
CHECK_EVERY = 5  # steps between convergence tests


def active_specialists(generalist_probs: torch.Tensor, subsets: torch.Tensor,
                       top_n: int = 1) -> torch.Tensor:
    """Which specialists an input calls on: those whose subset holds one of the generalist's
    top-n classes (§5, n=1 in the paper).

    generalist_probs: (B, C); subsets: (M, C) bool coverage. Returns (B, M) bool.
    """
    if subsets.shape[0] == 0:
        return torch.zeros(generalist_probs.shape[0], 0, dtype=torch.bool,
                           device=generalist_probs.device)
    top = generalist_probs.topk(min(top_n, generalist_probs.shape[1]), dim=1).indices  # (B, n)
    return subsets[:, top].permute(1, 0, 2).any(dim=2)  # (B, M)


def spread(specialist_probs: torch.Tensor, members: list[torch.Tensor],
           classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Place each specialist's output on the full class axis.

    specialist_probs: list-like of M tensors (B, |S_m| + 1), dustbin last; members: M index tensors
    (|S_m|,). Returns (P (B, M, C) with zeros outside each subset, d (B, M) dustbin
    probabilities, S (M, C) bool coverage).
    """
    b = specialist_probs[0].shape[0] if len(specialist_probs) else 0
    like = specialist_probs[0] if len(specialist_probs) else torch.zeros(())
    m = len(members)
    P = torch.zeros(b, m, classes, device=like.device, dtype=like.dtype)
    d = torch.zeros(b, m, device=like.device, dtype=like.dtype)
    S = torch.zeros(m, classes, dtype=torch.bool, device=like.device)
    for k, (probs, idx) in enumerate(zip(specialist_probs, members)):
        P[:, k, idx.to(like.device)] = probs[:, :-1]
        d[:, k] = probs[:, -1]
        S[k, idx.to(like.device)] = True
    return P, d, S


def objective(q: torch.Tensor, generalist_probs: torch.Tensor, P: torch.Tensor,
              d: torch.Tensor, S: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Per-input value of KL(p_g||q) + sum_active KL(p_m||q_m), in nats. Shapes as in `combine`;
    returns (B,)."""
    a = active.to(q.dtype)
    log_q = q.clamp_min(EPS).log()
    kl = (generalist_probs * (generalist_probs.clamp_min(EPS).log() - log_q)).sum(1)
    rest = q @ (~S).to(q.dtype).T  # (B, M): q's mass outside each subset
    inside = (P * (P.clamp_min(EPS).log() - log_q[:, None, :])).sum(2)  # (B, M)
    dust = d * (d.clamp_min(EPS).log() - rest.clamp_min(EPS).log())
    return kl + (a * (inside + dust)).sum(1)


@torch.no_grad()
def combine(generalist_probs: torch.Tensor, P: torch.Tensor, d: torch.Tensor, S: torch.Tensor,
            active: torch.Tensor, tol: float = 1e-7, max_steps: int = 500) -> torch.Tensor:
    """q (B, C) minimising eq. 5 for each input.

    generalist_probs: (B, C); P: (B, M, C) specialists' probabilities at their classes (0 elsewhere);
    d: (B, M) their dustbin probabilities; S: (M, C) bool coverage; active: (B, M) bool.
    Inputs with no active specialist get q = p_g exactly.
    """
    a = active.to(generalist_probs.dtype)
    outside = (~S).to(generalist_probs.dtype)  # (M, C)
    w = generalist_probs + torch.einsum("bm,bmc->bc", a, P)  # (B, C)
    ad = a * d  # (B, M): dustbin mass of the active specialists
    mass = 1.0 + a.sum(1, keepdim=True)  # (B, 1): 1 + n
    q = generalist_probs.clone()  # z starts at the generalist's logits
    out = q.clone()
    rows = torch.arange(len(q), device=q.device)  # inputs still moving
    for step in range(max_steps):
        rest = (q @ outside.T).clamp_min(EPS)  # (b, M)
        new = (w + q * ((ad / rest) @ outside)) / mass  # = q - g / (1 + n)
        if step % CHECK_EVERY == CHECK_EVERY - 1:  # the test syncs with the host: not every step
            moving = (new - q).abs().amax(1) >= tol
            if not bool(moving.all()):  # retire the inputs that have converged
                out[rows] = new
                rows, new, w, ad, mass = (t[moving] for t in (rows, new, w, ad, mass))
                if len(rows) == 0:
                    return out
        q = new
    out[rows] = q
    return out
