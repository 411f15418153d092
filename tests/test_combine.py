import pytest
import torch

from specialists.combine import active_specialists, combine, objective, spread



@pytest.fixture(autouse=True)
def float64():
    """Exact answers are compared to 1e-6 and better: work in float64, then restore."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def dirichlet(b, c, seed, concentration=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch._standard_gamma(torch.full((b, c), concentration), generator=g)
    return x / x.sum(1, keepdim=True)


def specialists(b, members, seed):
    return [dirichlet(b, len(m) + 1, seed + k) for k, m in enumerate(members)]


def test_no_active_specialist_gives_generalist():
    pg = dirichlet(6, 5, 0)
    members = [torch.tensor([0, 1])]
    P, d, S = spread(specialists(6, members, 1), members, 5)
    q = combine(pg, P, d, S, torch.zeros(6, 1, dtype=torch.bool))
    torch.testing.assert_close(q, pg, rtol=0, atol=0)


def test_full_distribution_models_give_the_mean():
    b, c = 8, 6
    pg, pa, pb = dirichlet(b, c, 0), dirichlet(b, c, 1), dirichlet(b, c, 2)
    everything = torch.arange(c)
    with_empty_dustbin = [torch.cat([p, torch.zeros(b, 1)], 1) for p in (pa, pb)]
    P, d, S = spread(with_empty_dustbin, [everything, everything], c)
    q = combine(pg, P, d, S, torch.ones(b, 2, dtype=torch.bool), tol=1e-12)
    torch.testing.assert_close(q, (pg + pa + pb) / 3, rtol=0, atol=1e-9)


def test_one_specialist_closed_form():
    b, c = 10, 7
    pg = dirichlet(b, c, 3)
    subset = torch.tensor([1, 4, 5])
    pm = dirichlet(b, 4, 4)
    P, d, S = spread([pm], [subset], c)
    q = combine(pg, P, d, S, torch.ones(b, 1, dtype=torch.bool), tol=1e-13, max_steps=5000)
    expected = torch.empty_like(pg)
    expected[:, subset] = (pg[:, subset] + pm[:, :-1]) / 2
    rest = torch.tensor([0, 2, 3, 6])
    pg_rest = pg[:, rest].sum(1, keepdim=True)
    expected[:, rest] = pg[:, rest] * (pg_rest + pm[:, -1:]) / (2 * pg_rest)
    torch.testing.assert_close(q, expected, rtol=0, atol=1e-8)


def reference(pg, probs, members, tol=1e-14, steps=100_000):
    """One input at a time, plain loops: the fixed point q_c = (w_c + sum_m r_mc) / (1 + n)."""
    c = pg.shape[0]
    q = pg.clone()
    for _ in range(steps):
        new = pg.clone()
        for p, m in zip(probs, members):
            rest = [j for j in range(c) if j not in m.tolist()]
            new[m] += p[:-1]
            new[rest] += p[-1] * q[rest] / q[rest].sum()
        new /= 1 + len(members)
        if (new - q).abs().max() < tol:
            return new
        q = new
    return q


def test_overlapping_specialists_match_fixed_point_and_are_stationary():
    b, c = 12, 9
    pg = dirichlet(b, c, 5)
    members = [torch.tensor([0, 1, 2]), torch.tensor([2, 3, 4, 5]), torch.tensor([5, 6]),
               torch.tensor([1, 7, 8])]
    probs = specialists(b, members, 6)
    P, d, S = spread(probs, members, c)
    active = active_specialists(pg, S, top_n=3)
    assert active.any(1).all() and not active.all()  # a mix of active sets
    q = combine(pg, P, d, S, active, tol=1e-12, max_steps=20_000)
    for i in range(b):
        on = active[i].nonzero().flatten().tolist()
        want = reference(pg[i], [probs[k][i] for k in on], [members[k] for k in on])
        torch.testing.assert_close(q[i], want, rtol=0, atol=1e-5)
    # the gradient with respect to z vanishes at q (autograd, independent of the solver)
    z = q.log().clone().requires_grad_(True)
    objective(torch.softmax(z, 1), pg, P, d, S, active).sum().backward()
    assert z.grad.abs().max() < 1e-6
    # and the fixed point is no worse than a nearby point
    nudged = torch.softmax(q.log() + 0.05 * torch.randn(b, c), 1)
    assert (objective(q, pg, P, d, S, active) <= objective(nudged, pg, P, d, S, active)).all()


def test_active_specialists_from_top_n():
    pg = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.1, 0.1, 0.2, 0.6]])
    S = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool)
    assert active_specialists(pg, S, 1).tolist() == [[True, False], [False, False]]
    assert active_specialists(pg, S, 2).tolist() == [[True, False], [False, True]]
