"""Auxiliary losses against their closed forms and independent implementations."""

import math

import pytest
import torch

from moe.losses import load_balancing_loss, sequence_load_balancing_loss, z_loss


def loop_load_balancing(probs, counts, top_k):
    """Switch/top-k loss by explicit loops over experts and tokens (float64)."""
    num_tokens, num_experts = probs.shape
    total = 0.0
    for e in range(num_experts):
        prob_sum = sum(float(probs[t, e]) for t in range(num_tokens))
        total += prob_sum * int(counts[e])
    return num_experts / (top_k * num_tokens**2) * total


def mixtral_style_loss(probs, chosen, num_experts):
    """HF Mixtral's form: E * sum_e (fraction of (token, slot) picks of e) * (mean prob of e); k times ours."""
    mask = torch.nn.functional.one_hot(chosen, num_experts).double()  # (T, k, E)
    fraction_per_slot = mask.mean(0)  # (k, E)
    mean_prob = probs.double().mean(0)  # (E,)
    return num_experts * (fraction_per_slot * mean_prob.unsqueeze(0)).sum()


def random_routing(num_tokens, num_experts, top_k, generator):
    logits = torch.randn(num_tokens, num_experts, generator=generator)
    probs = logits.softmax(-1)
    chosen = probs.topk(top_k, dim=-1).indices
    counts = torch.bincount(chosen.flatten(), minlength=num_experts)
    return probs, chosen, counts


@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2), (6, 3)])
def test_load_balancing_is_one_at_perfect_balance(num_experts, top_k):
    num_tokens = 3 * num_experts
    probs = torch.full((num_tokens, num_experts), 1.0 / num_experts)
    counts = torch.full((num_experts,), num_tokens * top_k // num_experts)
    assert load_balancing_loss(probs, counts, top_k).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("num_experts", [1, 2, 8])
def test_load_balancing_is_num_experts_at_collapse_with_k1(num_experts):
    num_tokens = 10
    probs = torch.zeros(num_tokens, num_experts)
    probs[:, 0] = 1.0
    counts = torch.zeros(num_experts, dtype=torch.long)
    counts[0] = num_tokens
    assert load_balancing_loss(probs, counts, 1).item() == pytest.approx(num_experts, rel=1e-6)


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 3, 1), (17, 5, 2), (40, 8, 3)])
def test_load_balancing_matches_loop_and_mixtral_over_k(num_tokens, num_experts, top_k):
    generator = torch.Generator().manual_seed(num_tokens)
    probs, chosen, counts = random_routing(num_tokens, num_experts, top_k, generator)
    ours = load_balancing_loss(probs, counts, top_k).item()
    assert ours == pytest.approx(loop_load_balancing(probs, counts, top_k), rel=1e-5)
    assert ours == pytest.approx(mixtral_style_loss(probs, chosen, num_experts).item() / top_k, rel=1e-5)


def test_load_balancing_gradient_flows_through_probs_only():
    num_tokens, num_experts, top_k = 12, 4, 2
    logits = torch.randn(num_tokens, num_experts)
    probs = logits.softmax(-1).requires_grad_(True)
    counts = torch.bincount(probs.topk(top_k, -1).indices.flatten(), minlength=num_experts).float()
    counts.requires_grad_(True)
    load_balancing_loss(probs, counts, top_k).backward()
    assert counts.grad is None
    expected = (num_experts / (top_k * num_tokens**2) * counts.detach()).expand(num_tokens, -1)
    torch.testing.assert_close(probs.grad, expected)


def test_load_balancing_empty_input_is_zero_with_grad():
    probs = torch.zeros(0, 4, requires_grad=True)
    loss = load_balancing_loss(probs, torch.zeros(4, dtype=torch.long), 2)
    assert loss.item() == 0.0
    loss.backward()
    assert probs.grad.shape == (0, 4)


@pytest.mark.parametrize("num_experts", [1, 2, 8, 64])
def test_z_loss_of_zero_logits_is_log_e_squared(num_experts):
    assert z_loss(torch.zeros(5, num_experts)).item() == pytest.approx(math.log(num_experts) ** 2, abs=1e-6)


def test_z_loss_matches_direct_formula():
    logits = 3 * torch.randn(9, 6)
    direct = sum(math.log(sum(math.exp(float(z)) for z in row)) ** 2 for row in logits) / logits.shape[0]
    assert z_loss(logits).item() == pytest.approx(direct, rel=1e-5)
    assert z_loss(torch.zeros(0, 6)).item() == 0.0


def switch_form(scores, mask, top_k):
    """The Switch/top-k loss of one sequence with normalised scores, via load_balancing_loss's formula."""
    normalised = scores / scores.sum(-1, keepdim=True)
    counts = mask.sum(0)
    return loop_load_balancing(normalised, counts, top_k)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
def test_sequence_loss_is_average_of_per_sequence_switch_form(score_function):
    batch, seq_len, num_experts, top_k = 3, 7, 5, 2
    logits = torch.randn(batch * seq_len, num_experts)
    scores = logits.softmax(-1) if score_function == "softmax" else logits.sigmoid()
    mask = torch.zeros_like(scores).scatter_(1, scores.topk(top_k, -1).indices, 1.0)
    ours = sequence_load_balancing_loss(scores, mask, top_k, seq_len).item()
    per_sequence = [
        switch_form(scores[b * seq_len : (b + 1) * seq_len], mask[b * seq_len : (b + 1) * seq_len], top_k)
        for b in range(batch)
    ]
    assert ours == pytest.approx(sum(per_sequence) / batch, rel=1e-5)


def test_sequence_loss_with_one_sequence_is_the_switch_loss():
    num_tokens, num_experts, top_k = 11, 4, 2
    probs, chosen, counts = random_routing(num_tokens, num_experts, top_k, torch.Generator().manual_seed(3))
    mask = torch.zeros_like(probs).scatter_(1, chosen, 1.0)
    ours = sequence_load_balancing_loss(probs, mask, top_k, num_tokens)
    torch.testing.assert_close(ours, load_balancing_loss(probs, counts, top_k))


def test_sequence_loss_rejects_seq_len_not_dividing_tokens():
    scores = torch.rand(10, 4)
    with pytest.raises(ValueError, match="seq_len=3"):
        sequence_load_balancing_loss(scores, torch.ones_like(scores), 1, 3)
    with pytest.raises(ValueError, match="seq_len=0"):
        sequence_load_balancing_loss(scores, torch.ones_like(scores), 1, 0)
