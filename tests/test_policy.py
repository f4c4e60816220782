"""§5 policy: Plackett-Luce probabilities, Gumbel-top-k sampling, REINFORCE with both baselines."""
import itertools
import math

import pytest
import torch

from reorder import (ORDERS, EMABaseline, PlackettLuce, loo_baseline, order, reinforce_loss,
                     triangle_tau)


def all_perms(n):
    return torch.tensor(list(itertools.permutations(range(n))))


def policy_with(logits):
    policy = PlackettLuce(len(logits))
    with torch.no_grad():
        policy.logits.copy_(torch.tensor(logits))
    return policy


@pytest.mark.parametrize("tau", [0.3, 1.0, 3.0])
def test_probabilities_of_all_permutations_sum_to_one(tau):
    policy = policy_with([0.5, -1.0, 2.0, 0.0, 0.3])
    total = policy.log_prob(all_perms(5), tau).exp().sum()
    assert abs(total.item() - 1.0) < 1e-5


def test_log_prob_matches_the_product_formula():
    s = [0.2, -0.7, 1.1]
    policy = policy_with(s)
    perm, tau = [2, 0, 1], 0.5
    z = [x / tau for x in s]
    expected = sum(z[perm[k]] - math.log(sum(math.exp(z[j]) for j in perm[k:])) for k in range(3))
    assert abs(policy.log_prob(torch.tensor(perm), tau).item() - expected) < 1e-6


def test_sample_frequencies_match_exact_probabilities():
    # Gumbel-top-k at tau = 0.7 against the exact Plackett-Luce probabilities: a chi-square test
    torch.manual_seed(0)
    policy, tau, draws = policy_with([1.0, 0.3, -0.5, 0.2]), 0.7, 20000
    perms = all_perms(4)
    expected = policy.log_prob(perms, tau).exp().detach() * draws
    sample, logp = policy.sample(draws, tau)
    code = (sample * torch.tensor([64, 16, 4, 1])).sum(-1)
    codes = (perms * torch.tensor([64, 16, 4, 1])).sum(-1)
    observed = torch.stack([(code == c).sum() for c in codes])
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 49.73  # 23 degrees of freedom, p = 0.001
    assert torch.allclose(logp, policy.log_prob(sample, tau))  # scored under the same logits / tau


@pytest.mark.parametrize("name", ORDERS + ("random",))
def test_from_order_mode_gives_the_order_back(name):
    for h, w in [(14, 14), (3, 5), (1, 1)]:
        perm = order(name, h, w)
        assert torch.equal(PlackettLuce.from_order(perm).mode(), perm)


def test_from_order_sets_the_ramp_in_slot_order():
    # s[perm[k]] = -k / (N - 1): the first slot's patch 0, the last's -1; perm is not its own
    # inverse, so ramp[perm] (the released code) would put these values on other patches
    perm = torch.tensor([2, 0, 4, 1, 3])
    assert not torch.equal(perm.argsort(), perm)
    assert PlackettLuce.from_order(perm).logits.tolist() == [-0.25, -0.75, 0.0, -1.0, -0.5]


def test_tau_zero_returns_the_mode_without_sampling():
    policy = PlackettLuce.from_order(order("hilbert", 4, 4))
    perm, logp = policy.sample(3, 0.0)
    assert torch.equal(perm, order("hilbert", 4, 4).expand(3, 16))
    assert torch.equal(logp, torch.zeros(3))


def test_log_prob_and_from_order_take_only_permutations_and_a_positive_tau():
    policy, row = PlackettLuce(4), order("row", 2, 2)
    not_perms = tuple(map(torch.tensor, ([0, 0, 1, 2], [-1, 0, 1, 2], [0, 1, 2, 4])))
    for bad in not_perms + (torch.tensor([0, 1, 2]),):  # the last: a permutation, of 3 not 4
        with pytest.raises(ValueError):
            policy.log_prob(bad)
    for bad in not_perms:
        with pytest.raises(ValueError, match="not a permutation"):
            PlackettLuce.from_order(bad)
    for tau in (0.0, -0.5, float("nan")):  # tau = 0 used to give NaN
        with pytest.raises(ValueError, match="tau must be > 0"):
            policy.log_prob(row, tau)


def test_extreme_logits_stay_finite():
    policy = policy_with([1e4, -1e4, 1e4, -1e4, 0.0, 5e3])
    for tau in (0.3, 1.0):
        perm, logp = policy.sample(16, tau)
        logp.sum().backward()
        assert torch.isfinite(logp).all() and torch.isfinite(policy.logits.grad).all()
        assert sorted(perm[0].tolist()) == list(range(6))
        policy.logits.grad = None


def test_gumbel_noise_never_takes_log_of_zero(monkeypatch):
    # force uniforms of exactly 0 and 1, the two places where -log(-log(u)) breaks
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor([[0.0, 1.0, 0.5]]))
    perm, logp = policy_with([0.0, 0.0, 0.0]).sample(1, 1.0)
    assert sorted(perm[0].tolist()) == [0, 1, 2] and torch.isfinite(logp).all()
    # the noise stays finite (about -4.5 and +16), so logits 100 apart still decide the order;
    # infinite noise would put patch 1 first and patch 0 last whatever the logits
    perm, _ = policy_with([0.0, -100.0, 100.0]).sample(1, 1.0)
    assert perm[0].tolist() == [2, 0, 1]


def test_temperature_is_a_per_step_triangle():
    taus = [triangle_tau(step - 10, 20, 1.0) for step in range(40)]
    assert taus[:10] == [0] * 10 and taus[30:] == [0] * 10
    inside = taus[10:30]
    assert all(t > 0 for t in inside) and max(inside) > 0.9
    assert inside == pytest.approx(inside[::-1])  # symmetric
    assert all(a < b for a, b in zip(inside[:10], inside[1:10]))  # rises every step


def reward_table(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n ** n, generator=g)  # indexed by the base-n code of a permutation


def perm_code(perm, n):
    return (perm * (n ** torch.arange(n - 1, -1, -1))).sum(-1)


@pytest.mark.parametrize("baseline", ["ema", "loo"])
def test_reinforce_matches_the_exact_gradient(baseline):
    """Average REINFORCE gradients over many samples: equal to -∇ E[r], computed by enumeration."""
    torch.manual_seed(1)
    n, tau, batch, steps = 4, 0.5, 32, 600
    table = reward_table(n) + 3.0  # an offset that a wrong baseline would turn into bias
    policy = policy_with([0.4, -0.2, 0.9, 0.0])
    perms = all_perms(n)
    expected = (policy.log_prob(perms, tau).exp() * table[perm_code(perms, n)]).sum()
    exact = -torch.autograd.grad(expected, policy.logits)[0]

    ema, estimates = EMABaseline(0.99), []
    for _ in range(steps):
        perm, logp = policy.sample(batch, tau)
        reward = table[perm_code(perm, n)]
        b = ema(reward.mean().item()) if baseline == "ema" else loo_baseline(reward)
        estimates.append(torch.autograd.grad(reinforce_loss(logp, reward, b), policy.logits)[0])
    estimates = torch.stack(estimates)
    mean, se = estimates.mean(0), estimates.std(0) / math.sqrt(steps)
    assert ((mean - exact).abs() < 4 * se + 1e-4).all(), (mean, exact, se)
    assert exact.abs().max() > 10 * se.max()  # the test has the power to see a wrong gradient



def test_reinforce_loss_refuses_rewards_of_another_shape_than_the_log_probs():
    log_prob = torch.zeros(4, requires_grad=True)
    with pytest.raises(ValueError, match="one shape"):
        reinforce_loss(log_prob, torch.zeros(4, 1), 0.0)  # would broadcast to [4, 4]

def test_reinforce_loss_sends_no_gradient_through_the_reward_or_the_baseline():
    # a reward computed from a model without detaching it (-cross-entropy) must not train the
    # model through the policy's loss: only log p gets a gradient, -(r - b) / K
    log_prob = torch.zeros(2, requires_grad=True)
    reward, baseline = torch.tensor([1.0, 3.0], requires_grad=True), torch.tensor(0.5)
    reinforce_loss(log_prob, reward, baseline).backward()
    assert log_prob.grad.tolist() == [-0.25, -1.25] and reward.grad is None


def test_ema_baseline_weighs_the_old_value_by_the_momentum():
    assert EMABaseline().momentum == 0.99  # the paper's
    ema = EMABaseline(0.75)  # not 0.5: swapped weights would give the same numbers
    assert [ema(r) for r in (4.0, 0.0, 8.0, 0.0)] == [4.0, 4.0, 3.0, 4.25]  # 0.75 old + 0.25 new


def test_ema_baseline_follows_rewards_and_round_trips():
    ema = EMABaseline(0.5)
    assert ema(2.0) == 2.0  # first step: its own mean
    assert ema(4.0) == 2.0  # then only earlier steps
    assert ema(0.0) == 3.0
    clone = EMABaseline()
    clone.load_state_dict(ema.state_dict())
    assert clone.value == ema.value == 1.5 and clone.momentum == 0.5


def test_loo_baseline_is_the_mean_of_the_others():
    assert loo_baseline(torch.tensor([1.0, 2.0, 6.0])).tolist() == [4.0, 3.5, 1.5]
    reward = torch.tensor([[1.0, 2.0, 6.0], [0.0, 4.0, 8.0]])  # [orders, images]
    assert loo_baseline(reward, dim=1).tolist() == [[4.0, 3.5, 1.5], [6.0, 4.0, 2.0]]
    assert loo_baseline(reward, dim=0).tolist() == [[0.0, 4.0, 8.0], [1.0, 2.0, 6.0]]
    with pytest.raises(ValueError, match="at least 2"):
        loo_baseline(torch.tensor([1.0]))
