import pytest
import torch

from specialists.clustering import (affinity, assign_subsets, leakage, online_kmeans,
                                    pair_agreement, prediction_covariance)

BLOCKS = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def planted_probs(n=3000, loner=True, seed=0):
    """A generalist that confuses classes only within planted blocks; class 9 is never confused."""
    g = torch.Generator().manual_seed(seed)
    classes = 10 if loner else 9
    true = torch.randint(classes, (n,), generator=g)
    probs = torch.full((n, classes), 0.002)
    for i, t in enumerate(true.tolist()):
        block = next((b for b in BLOCKS if t in b), [t])
        share = torch.rand(len(block), generator=g) ** 2
        probs[i, block] += 0.6 * share / share.sum()
        probs[i, t] += 0.4
    return probs / probs.sum(1, keepdim=True)


def test_covariance_matches_torch():
    p = planted_probs(200)
    torch.testing.assert_close(prediction_covariance(p), torch.cov(p.T))


@pytest.mark.parametrize("compare", ["correlation", "offdiag"])
def test_recovers_planted_blocks(compare):
    aff = affinity(prediction_covariance(planted_probs(loner=False)), compare)
    assert aff.diagonal().abs().max() == 0  # the diagonal is left out
    subsets = assign_subsets(aff, k=3, seed=1)
    assert sorted(subsets) == BLOCKS
    assert pair_agreement(subsets, BLOCKS) == {"pair_recall": 1.0, "pair_precision": 1.0}


def test_overlap_loners_and_minimum_size():
    aff = affinity(prediction_covariance(planted_probs()), "correlation")
    # with a fourth cluster the never-confused class 9 is alone, and a subset of one is dropped
    assert sorted(assign_subsets(aff, k=4, seed=0)) == BLOCKS
    # forced into one of three clusters, it is tied to none and stays with the generalist
    kept = assign_subsets(aff, k=3, seed=0, min_tie=0.0)
    assert all(9 not in s for s in kept) and len(kept) == 3
    # overlap: every class also joins its nearest other cluster
    overlapping = assign_subsets(aff, k=3, seed=0, overlap=1, min_tie=0.0)
    assert all(sum(c in s for s in overlapping) == 2 for c in range(9))


def test_online_kmeans_finds_separated_centres():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.0, 5.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    found = online_kmeans(points, 3, iterations=50, batch=20, seed=3).float()
    dist = torch.cdist(centres, found)
    assert dist.min(1).values.max() < 0.2


def test_pair_agreement_counts_pairs():
    got = pair_agreement([[0, 1, 5]], [[0, 1, 2], [5, 6]])
    assert got["pair_recall"] == pytest.approx(1 / 4) and got["pair_precision"] == pytest.approx(1 / 3)


def test_max_size_balances_lopsided_clusters():
    """Classes a generalist never confuses have near-zero columns and k-means puts them all in
    one cluster; max_size caps every core, and the confused blocks still stay together."""
    g = torch.Generator().manual_seed(0)
    blocks = [[3 * b, 3 * b + 1, 3 * b + 2] for b in range(6)]  # 18 confused, 30 clear classes
    true = torch.randint(48, (20000,), generator=g)
    probs = torch.full((len(true), 48), 1e-4)
    for i, t in enumerate(true.tolist()):
        block = blocks[t // 3] if t < 18 else [t]
        share = torch.rand(len(block), generator=g)
        probs[i, block] += 0.5 * share / share.sum()
        probs[i, t] += 0.5
    aff = affinity(prediction_covariance(probs / probs.sum(1, keepdim=True)), "offdiag")
    plain = assign_subsets(aff, k=7, seed=1)
    assert pair_agreement(plain, blocks)["pair_recall"] == 1.0
    assert max(map(len, plain)) == 30  # the clear classes in one lump
    capped = assign_subsets(aff, k=7, seed=1, max_size=1.5)
    assert max(map(len, capped)) <= 11 and sum(map(len, capped)) == 48  # ceil(1.5 * 48 / 7)
    assert pair_agreement(capped, blocks)["pair_recall"] == 1.0
    # with overlap the clear classes, all nearest to one other cluster, must not lump again
    with_overlap = assign_subsets(aff, k=7, seed=1, max_size=1.5, overlap=1)
    assert max(map(len, with_overlap)) <= 22  # ceil(1.5 * 2 * 48 / 7)
    assert sum(map(len, with_overlap)) == 96 and pair_agreement(with_overlap, blocks)[
        "pair_recall"] == 1.0
    with pytest.raises(ValueError, match="needs leak"):
        assign_subsets(aff, k=7, overlap=1, overlap_mass=0.1)


def test_overlap_mass_covers_only_the_classes_that_leak():
    """overlap_mass: class 2, which the generalist also confuses with 3-5, joins that subset too;
    the others, which leak nothing beyond their own block, stay in one subset each."""
    probs = planted_probs(loner=False)
    called = probs.argmax(1)
    probs[called == 2, 3:6] += 0.1  # where the generalist says 2, 0.3 / 1.3 goes to 3-5
    probs = probs / probs.sum(1, keepdim=True)
    leak = leakage(probs)
    assert torch.allclose(leak.sum(1), torch.ones(9, dtype=leak.dtype))
    assert 0.2 < leak[2, 3:6].sum() < 0.3 and leak[0, 3:6].sum() < 0.02
    aff = affinity(prediction_covariance(probs), "correlation")
    subsets = assign_subsets(aff, k=3, seed=1, overlap=1, leak=leak, overlap_mass=0.05)
    assert sorted(subsets) == [[0, 1, 2], [2, 3, 4, 5], [6, 7, 8]]
    every = assign_subsets(aff, k=3, seed=1, overlap=1)  # without overlap_mass: all join
    assert all(sum(c in s for s in every) == 2 for c in range(9))
