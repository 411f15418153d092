import math

import pytest
import torch
from torch import nn

from specialists.specialist import (DustbinHead, collapsed_soft_targets, draw_batch,
                                    dustbin_offset, init_from_generalist, local_labels)


def test_local_labels():
    y = torch.tensor([0, 3, 7, 3, 9])
    assert local_labels(y, torch.tensor([3, 7]), 10).tolist() == [2, 0, 1, 0, 2]


def test_output_layer_starts_from_the_generalist():
    torch.manual_seed(0)
    gen = nn.Linear(6, 5)
    with torch.no_grad():
        gen.weight[[0, 2, 3]] = gen.weight[0].clone()  # the rest's rows equal: their log-sum-exp is exact
        gen.bias[[0, 2, 3]] = gen.bias[0].clone()
    members = torch.tensor([1, 4])
    spec = DustbinHead(6, 3)
    init_from_generalist(spec, gen, members)
    h = torch.randn(8, 6)
    z, s = gen(h), spec(h)
    torch.testing.assert_close(s[:, :2], z[:, members])
    torch.testing.assert_close(s[:, 2], torch.logsumexp(z[:, [0, 2, 3]], 1))


def test_draw_batch_shares():
    g = torch.Generator().manual_seed(0)
    inside, outside = torch.arange(0, 10), torch.arange(10, 1000)
    idx = draw_batch(inside, outside, 100, 0.5, g)
    assert (idx < 10).sum() == 50 and len(idx) == 100
    many = torch.cat([draw_batch(inside, outside, 100, 0.5, g) for _ in range(200)])
    rest = many[many >= 10]
    assert abs((rest < 505).float().mean().item() - 0.5) < 0.03  # uniform over the others


def test_offset_formula():
    assert dustbin_offset(0.5, 0.2) == pytest.approx(math.log(0.5 * 0.8 / (0.2 * 0.5)))
    assert dustbin_offset(0.3, 0.3) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        dustbin_offset(1.0, 0.2)


def test_corrected_dustbin_probability_matches_natural_share():
    """Trained on 50/50 batches, the corrected specialist's mean dustbin probability on data in
    natural proportions comes out near 1 - pi; uncorrected it would not."""
    g = torch.Generator().manual_seed(0)
    n, pi = 20_000, 0.2
    y = (torch.rand(n, generator=g) >= pi).long()  # 0: the subset's one class; 1: everything else
    x = torch.randn(n, 2, generator=g) + torch.tensor([[1.0, 0.0]]) * (1 - 2 * y[:, None])
    net = DustbinHead(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    inside, outside = (y == 0).nonzero().flatten(), (y == 1).nonzero().flatten()
    seen_in = seen = 0
    for _ in range(1500):
        idx = draw_batch(inside, outside, 200, 0.5, g)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen_in += int((y[idx] == 0).sum())
        seen += len(idx)
    net.eval()
    with torch.no_grad():
        raw = torch.softmax(net(x), 1)[:, -1].mean().item()
        net.dustbin_offset.fill_(dustbin_offset(seen_in / seen, pi))
        corrected = torch.softmax(net(x), 1)[:, -1].mean().item()
    assert abs(corrected - (1 - pi)) < 0.02
    assert abs(raw - (1 - pi)) > 0.1


def test_dustbin_correction_off_leaves_the_dustbin_as_trained():
    """specialists.dustbin_correction false: eq. 5 sees each specialist's dustbin as trained
    (its eval offset 0), so the specialist weighs its own classes more than when corrected."""
    from ensemble.config import SpecialistsConfig
    from specialists.ensemble import Ensemble

    class Generalist:
        def probs(self, x, temperature):
            return torch.tensor([[0.4, 0.35, 0.25]]).expand(len(x), 3)

    def specialist():
        head = DustbinHead(2, 3)  # classes 0 and 1, and the dustbin
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
            head.dustbin_offset.fill_(2.0)
        return nn.Sequential(head)

    x = torch.zeros(4, 2)
    q = {}
    for corrected in (True, False):
        cfg = SpecialistsConfig(k=2, top_n=1, dustbin_correction=corrected)
        model = specialist()
        ens = Ensemble(Generalist(), [model], [[0, 1]], 3, cfg)
        q[corrected] = ens.predict(x)[1]
        assert float(model[0].dustbin_offset) == (2.0 if corrected else 0.0)
    assert q[False][0, 0] > q[True][0, 0] and q[False][0, 2] < q[True][0, 2]


def test_collapsed_soft_targets():
    """The generalist's probabilities over the subset and, in the dustbin, the rest's sum (T = 1),
    softened as one distribution of K + 1 classes (not hundreds of softened ones summed), at the
    prior the offset names."""
    torch.manual_seed(0)
    logits = 3 * torch.randn(6, 40)
    members = torch.tensor([1, 4, 7])
    rest = torch.ones(40, dtype=torch.bool)
    rest[members] = False
    p = torch.softmax(logits, 1)
    plain = collapsed_soft_targets(logits, members, rest, 1.0, 0.0)
    torch.testing.assert_close(plain[:, :3], p[:, members])
    torch.testing.assert_close(plain[:, 3], p[:, rest].sum(1))
    soft = collapsed_soft_targets(logits, members, rest, 3.0, 0.0)
    torch.testing.assert_close(soft, torch.softmax(plain.log() / 3.0, 1))
    summed = torch.softmax(logits / 3.0, 1)[:, rest].sum(1)
    assert (soft[:, 3] < summed).all()  # softening 37 classes apart would swell the dustbin
    shifted = collapsed_soft_targets(logits, members, rest, 1.0, math.log(4.0))
    odds, odds_before = shifted[:, 3] / shifted[:, 0], plain[:, 3] / plain[:, 0]
    torch.testing.assert_close(odds, odds_before / 4.0)
    both = collapsed_soft_targets(logits, members, rest, 3.0, math.log(4.0))
    torch.testing.assert_close(both[:, 3] / both[:, 0], (soft[:, 3] / soft[:, 0]) / 4 ** (1 / 3))
