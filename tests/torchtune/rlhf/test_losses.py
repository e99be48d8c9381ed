# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""DPO / IPO / SimPO against TRL on the same log-probabilities.

TRL 1.16's ``DPOTrainer`` computes its loss inline in ``_compute_loss`` from a model's outputs,
with no function that takes log-probabilities; its ``CPOTrainer.cpo_loss`` does take them and
implements the same formulas: ``sigmoid`` with label smoothing (conservative DPO), ``ipo`` and
``simpo``. DPO is CPO's sigmoid loss applied to the policy-minus-reference log-ratios, IPO is
CPO's ipo loss on the length-averaged log-ratios (how ``DPOTrainer``'s ``ipo`` branch averages
them), and SimPO is CPO's simpo loss on the length-averaged policy log-probabilities
(``average_log_prob=True`` in ``CPOTrainer``). So ``cpo_loss`` is called here as the reference,
unbound, with the few attributes it reads.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from torchtune.rlhf import DPOLoss, IPOLoss, SimPOLoss

B = 7


@pytest.fixture
def logps():
    g = torch.Generator().manual_seed(0)
    policy = -torch.rand(2, B, generator=g, dtype=torch.float64) * 40
    ref = policy + torch.randn(2, B, generator=g, dtype=torch.float64) * 3
    lengths = torch.randint(1, 30, (2, B), generator=g)
    lengths[1, 0] = 0  # an empty response counts as one token
    return policy, ref, lengths


def _trl_cpo_loss(loss_type, beta, chosen, rejected, label_smoothing=0.0, simpo_gamma=0.5):
    cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    fake_self = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
        accelerator=SimpleNamespace(device=chosen.device),
    )
    return cpo_trainer.CPOTrainer.cpo_loss(fake_self, chosen, rejected)


@pytest.mark.parametrize("beta, label_smoothing", [(0.1, 0.0), (0.5, 0.0), (0.3, 0.2)])
def test_dpo_matches_trl(logps, beta, label_smoothing):
    (pc, pr), (rc, rr), (nc, nr) = logps
    losses, chosen_r, rejected_r = DPOLoss(beta, label_smoothing)(pc, pr, rc, rr, nc, nr)
    expected, _, _ = _trl_cpo_loss("sigmoid", beta, pc - rc, pr - rr, label_smoothing)
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=0)
    # DPOTrainer's rewards: beta * (policy - reference).
    torch.testing.assert_close(chosen_r, beta * (pc - rc))
    torch.testing.assert_close(rejected_r, beta * (pr - rr))


def test_dpo_at_the_reference_is_ln2(logps):
    (pc, pr), _, (nc, nr) = logps
    losses, chosen_r, rejected_r = DPOLoss(0.1)(pc, pr, pc.clone(), pr.clone(), nc, nr)
    torch.testing.assert_close(losses, torch.full_like(losses, math.log(2)))
    assert not chosen_r.any() and not rejected_r.any()


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ipo_matches_trl(logps, tau):
    (pc, pr), (rc, rr), (nc, nr) = logps
    losses, chosen_r, rejected_r = IPOLoss(tau)(pc, pr, rc, rr, nc, nr)
    # DPOTrainer's ipo branch: scores divided by completion_mask.sum(1).clamp(min=1).
    nc1, nr1 = nc.clamp(min=1), nr.clamp(min=1)
    expected, _, _ = _trl_cpo_loss("ipo", tau, (pc - rc) / nc1, (pr - rr) / nr1)
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(chosen_r, tau * (pc - rc))
    torch.testing.assert_close(rejected_r, tau * (pr - rr))


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.5), (2.5, 1.4)])
def test_simpo_matches_trl(logps, beta, gamma):
    (pc, pr), _, (nc, nr) = logps
    losses, chosen_r, rejected_r = SimPOLoss(beta, gamma)(pc, pr, None, None, nc, nr)
    ac, ar = pc / nc.clamp(min=1), pr / nr.clamp(min=1)
    expected, exp_chosen, exp_rejected = _trl_cpo_loss("simpo", beta, ac, ar, simpo_gamma=gamma)
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(chosen_r, exp_chosen)
    torch.testing.assert_close(rejected_r, exp_rejected)


def test_gradients_flow_to_the_policy_only(logps):
    (pc, pr), (rc, rr), (nc, nr) = logps
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    losses, _, _ = DPOLoss(0.1)(pc, pr, rc, rr, nc, nr)
    losses.sum().backward()
    # d/dpc of -log sigmoid(h) = -beta * sigmoid(-h).
    h = 0.1 * ((pc - rc) - (pr - rr)).detach()
    torch.testing.assert_close(pc.grad, -0.1 * torch.sigmoid(-h))
    torch.testing.assert_close(pr.grad, 0.1 * torch.sigmoid(-h))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: DPOLoss(beta=0.0), "beta must be > 0, got 0.0"),
        (lambda: DPOLoss(label_smoothing=0.5), r"label_smoothing must be in \[0, 0.5\), got 0.5"),
        (lambda: IPOLoss(tau=-1.0), "tau must be > 0, got -1.0"),
        (lambda: SimPOLoss(beta=0.0), "beta must be > 0, got 0.0"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_reference_losses_refuse_a_missing_reference(logps):
    (pc, pr), _, (nc, nr) = logps
    for loss in (DPOLoss(), IPOLoss()):
        with pytest.raises(ValueError, match=f"{type(loss).__name__} needs the reference"):
            loss(pc, pr, None, None, nc, nr)
    assert not SimPOLoss.needs_reference and DPOLoss.needs_reference and IPOLoss.needs_reference
