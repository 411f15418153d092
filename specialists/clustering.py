"""§5.2 of the paper: assign classes to specialists by clustering the covariance matrix of the
generalist's predictions — no labels used.

Classes that the generalist confuses rise and fall together in its predicted probabilities, so
their columns of the covariance matrix look alike. Raw columns are dominated by the diagonal
(each class's own variance), so columns are compared with the diagonal left out, either as
covariances or as correlations (`compare`). The columns are clustered with an online
(mini-batch) k-means; a class may also join its `overlap` nearest other clusters (the paper's
specialists overlapped), a class whose tie to every cluster is below `min_tie` stays with the
generalist alone, and subsets smaller than `min_size` are dropped.

On many classes the clusters come out lopsided: a confident generalist's well-told classes have
near-zero columns and all fall into one cluster (1000 font classes, k = 16: sizes 2 to 913). With
`max_size` (a multiple of classes / k) each cluster's core holds at most that many classes:
k-means's centroids are refined by rounds of capacity-bounded assignment and re-centring: the
classes tied to one cluster choose first, those near every cluster (the well-told ones) fill
what room is left.

With a fixed `overlap` every class is covered by 1 + overlap specialists. The paper's coverage
varied (its Table 4: 0 to 10 and more), and the classes a generalist confuses most are those that
need it: with `overlap_mass` a class joins another cluster only when, on the inputs the
generalist calls that class, at least that share of the probability goes to the cluster's core
(`leakage`, again no labels; from the probabilities at the coordinator's temperature, so the
share depends on it). With `max_size`, a subset holds at most max_size x (1 + overlap) x
classes / k classes after overlap as well: every class's first choice is placed before any
class's second, and a class whose choice is full joins its next nearest.
"""
from __future__ import annotations

import itertools
import math

import torch


def prediction_covariance(probs: torch.Tensor) -> torch.Tensor:
    """Covariance (C, C) of the predicted probabilities probs (N, C) over inputs."""
    centred = probs - probs.mean(0, keepdim=True)
    return centred.T @ centred / max(1, probs.shape[0] - 1)


def affinity(cov: torch.Tensor, compare: str = "correlation") -> torch.Tensor:
    """Class-by-class similarity (C, C) with the diagonal left out (set to 0): correlations, or
    covariances scaled by their largest magnitude."""
    if compare == "correlation":
        sd = cov.diagonal().clamp_min(1e-12).sqrt()
        out = cov / (sd[:, None] * sd[None, :])
    else:
        off = cov - torch.diag(cov.diagonal())
        out = off / off.abs().max().clamp_min(1e-12)
    return out - torch.diag(out.diagonal())


def online_kmeans(points: torch.Tensor, k: int, iterations: int = 100, batch: int = 0,
                  seed: int = 0, restarts: int = 10) -> torch.Tensor:
    """Mini-batch k-means (Sculley 2010) of points (N, D): k-means++ start, then per iteration a
    random batch pulls its nearest centroids towards it with rate 1/(points seen). The best of
    `restarts` runs (least squared distance to the nearest centroid) wins. Returns (k, D)."""
    g = torch.Generator().manual_seed(seed)
    points = points.cpu().double()
    best, best_cost = None, float("inf")
    for _ in range(restarts):
        centroids = _kmeans_once(points, k, iterations, batch or len(points), g)
        cost = (torch.cdist(points, centroids).min(1).values ** 2).sum().item()
        if cost < best_cost:
            best, best_cost = centroids, cost
    return best


def _kmeans_once(points: torch.Tensor, k: int, iterations: int, batch: int,
                 g: torch.Generator) -> torch.Tensor:
    n = points.shape[0]
    centroids = [points[torch.randint(n, (1,), generator=g).item()]]
    for _ in range(1, k):  # k-means++: far points are likelier next centroids
        dist = torch.cdist(points, torch.stack(centroids)).min(1).values ** 2
        if dist.sum() <= 0:
            choice = torch.randint(n, (1,), generator=g).item()
        else:
            choice = torch.multinomial(dist / dist.sum(), 1, generator=g).item()
        centroids.append(points[choice])
    centroids = torch.stack(centroids)
    seen = torch.zeros(k, dtype=torch.float64)
    for _ in range(iterations):
        idx = torch.randperm(n, generator=g)[:batch]
        nearest = torch.cdist(points[idx], centroids).argmin(1)
        for i, c in zip(idx.tolist(), nearest.tolist()):
            seen[c] += 1
            centroids[c] += (points[i] - centroids[c]) / seen[c]
    return centroids


def assign_subsets(aff: torch.Tensor, k: int, iterations: int = 100, seed: int = 0,
                   overlap: int = 0, min_tie: float = -1.0,
                   min_size: int = 2, max_size: float = 0.0, leak: torch.Tensor | None = None,
                   overlap_mass: float = 0.0) -> list[list[int]]:
    """Class subsets (sorted lists of class indices) from an affinity matrix (C, C). With
    `leak` (C, C; `leakage`) and `overlap_mass`, a class joins only the other clusters, up to
    `overlap` of them and most first, whose cores take at least that share of its mass."""
    classes = aff.shape[0]
    points = aff.double()
    centroids = online_kmeans(points, k, iterations, seed=seed)
    if max_size:
        nearest, centroids = balanced(points, centroids, math.ceil(max_size * classes / k))
    dist = torch.cdist(points, centroids)  # (C, k)
    order = dist.argsort(1)
    if not max_size:
        nearest = order[:, 0]
    core = [set((nearest == j).nonzero().flatten().tolist()) for j in range(k)]
    members = [set(c) for c in core]
    home = nearest.tolist()
    if overlap_mass > 0:  # the mass each class leaks to each cluster's core
        if leak is None:
            raise ValueError("overlap_mass needs leak, the (C, C) matrix of leakage()")
        mass = leak.double() @ torch.nn.functional.one_hot(nearest, k).double()  # (C, k)
        order = mass.argsort(dim=1, descending=True, stable=True)
    joins = []  # (rank, class, cluster): each class's other clusters, nearest first
    for c in range(classes):
        near = [j for j in order[c].tolist() if j != home[c]]
        if overlap_mass > 0 or not max_size:  # without a bound no choice is ever full
            near = [j for j in near[:overlap] if overlap_mass <= 0 or mass[c, j] >= overlap_mass]
        joins += [(rank, c, j) for rank, j in enumerate(near)]
    # with max_size the bound holds after overlap too: the clear classes, all nearest to one
    # other cluster, would lump there again; a class whose choice is full takes its next
    room = [math.ceil(max_size * (1 + overlap) * classes / k) - len(m) if max_size else classes
            for m in members]
    wanted = [overlap] * classes
    for _, c, j in sorted(joins):  # everyone's first choice before anyone's second
        if wanted[c] and room[j] > 0:
            members[j].add(c)
            wanted[c] -= 1
            room[j] -= 1

    def tie(c, j):  # mean affinity of class c with the core of cluster j (itself left out)
        others = [i for i in core[j] if i != c]
        return aff[c, others].mean().item() if others else float("-inf")

    loners = {c for c in range(classes)
              if max(tie(c, j) for j in range(k) if c in members[j]) < min_tie}
    subsets = [sorted(m - loners) for m in members]
    subsets = [s for s in subsets if len(s) >= min_size]
    unique = sorted(set(map(tuple, subsets)))
    return [list(s) for s in unique]


def leakage(probs: torch.Tensor) -> torch.Tensor:
    """(C, C): row c the mean of the predicted probabilities (N, C) over the inputs predicted
    as class c (zeros where none is): where a class's probability mass goes. No labels."""
    classes = probs.shape[1]
    called = probs.argmax(1)
    total = torch.zeros(classes, classes, dtype=probs.dtype).index_add_(0, called, probs)
    counts = torch.bincount(called, minlength=classes).clamp_min(1)
    return total / counts[:, None].to(probs.dtype)


def balanced(points: torch.Tensor, centroids: torch.Tensor, capacity: int,
             rounds: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's cluster (N,) with at most `capacity` points a cluster, and the centroids
    (k, D) re-centred on them. Per round, points with most to lose choose first (the gap between
    their nearest and second-nearest centroids), each taking its nearest cluster with room, so
    the points that sit near many clusters fill what is left; until the assignment stops
    changing or after `rounds`."""
    n, k = points.shape[0], centroids.shape[0]
    if capacity * k < n:
        raise ValueError(f"{k} clusters of at most {capacity} cannot hold {n} points")
    nearest = torch.full((n,), -1, dtype=torch.long)
    for _ in range(rounds):
        dist = torch.cdist(points, centroids)
        ranked = dist.sort(1)
        gap = ranked.values[:, 1] - ranked.values[:, 0] if k > 1 else torch.zeros(n)
        assigned, room = [0] * n, [capacity] * k
        for point in gap.argsort(descending=True, stable=True).tolist():
            cluster = next(j for j in ranked.indices[point].tolist() if room[j])
            assigned[point] = cluster
            room[cluster] -= 1
        assigned = torch.tensor(assigned)
        if torch.equal(assigned, nearest):
            break
        nearest = assigned
        centroids = torch.stack([points[nearest == j].mean(0) if (nearest == j).any()
                                 else centroids[j] for j in range(k)])
    return nearest, centroids


def pair_agreement(subsets: list[list[int]], groups: list[list[int]]) -> dict[str, float]:
    """How the subsets agree with known groups, over pairs of classes: recall = share of the
    groups' within-group pairs that some subset holds together; precision = share of the
    subsets' pairs that lie within one group."""
    found = {p for s in subsets for p in itertools.combinations(sorted(s), 2)}
    truth = {p for g in groups for p in itertools.combinations(sorted(g), 2)}
    recall = len(found & truth) / len(truth) if truth else float("nan")
    precision = len(found & truth) / len(found) if found else float("nan")
    return {"pair_recall": recall, "pair_precision": precision}
