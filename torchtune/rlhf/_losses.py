# Copyright (c) torchtune contributors. BSD-3-Clause license.
"""Preference losses over sequence log-probabilities: DPO, IPO and SimPO.

Each loss takes the policy's (and, where it has one, the reference's) summed log-probabilities
of the chosen and rejected responses plus their scored-token counts, and returns per-pair
losses and rewards. Which of them a loss averages over the tokens is the loss's business, so a
recipe computes sums once and hands every loss the same arguments.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Pair = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _require_reference(name: str, *refs: Optional[torch.Tensor]) -> None:
    if any(r is None for r in refs):
        raise ValueError(f"{name} needs the reference model's log-probabilities; got None")


class DPOLoss(nn.Module):
    """Direct Preference Optimization (Rafailov et al. 2023), sigmoid form.

    With ``h = beta * ((pc - rc) - (pr - rr))`` (policy / reference summed log-probabilities
    of chosen / rejected), the loss of a pair is ``-(1 - eps) log sigmoid(h) - eps log
    sigmoid(-h)``: ``eps = label_smoothing > 0`` is conservative DPO, which assumes a fraction
    ``eps`` of the labels are flipped. Rewards are ``beta * (policy - reference)``.

    Args:
        beta: the inverse temperature (the strength of the KL tie to the reference).
        label_smoothing: ``eps`` in ``[0, 0.5)``.

    Raises:
        ValueError: if ``beta <= 0`` or ``label_smoothing`` is outside ``[0, 0.5)``.
    """

    needs_reference = True

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        super().__init__()
        _check_positive("beta", beta)
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta = float(beta)
        self.label_smoothing = float(label_smoothing)

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: Optional[torch.Tensor],
        ref_rejected_logps: Optional[torch.Tensor],
        chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor,
    ) -> Pair:
        """
        Args:
            policy_chosen_logps: ``[b]`` summed log-probabilities of the chosen responses.
            policy_rejected_logps: ``[b]``, of the rejected ones.
            ref_chosen_logps: ``[b]``, the reference model's (no gradient needed).
            ref_rejected_logps: ``[b]``.
            chosen_lengths: ``[b]`` scored tokens per chosen response (unused here).
            rejected_lengths: ``[b]`` (unused here).

        Returns:
            ``(losses, chosen_rewards, rejected_rewards)``, each ``[b]``; the rewards detached.

        Raises:
            ValueError: if a reference tensor is None.
        """
        _require_reference("DPOLoss", ref_chosen_logps, ref_rejected_logps)
        chosen_ratio = policy_chosen_logps - ref_chosen_logps
        rejected_ratio = policy_rejected_logps - ref_rejected_logps
        h = self.beta * (chosen_ratio - rejected_ratio)
        eps = self.label_smoothing
        losses = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)
        return losses, self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach()


class IPOLoss(nn.Module):
    """Identity Preference Optimization (Azar et al. 2023, eq. 17).

    The log-ratios are averaged over each response's scored tokens (as TRL computes it, so
    ``tau`` means the same whatever the response lengths): with ``d = (pc - rc) / n_c - (pr -
    rr) / n_r`` a pair's loss is ``(d - 1 / (2 tau))^2``. Rewards are ``tau * (policy -
    reference)`` on the summed log-probabilities, as TRL logs them.

    Args:
        tau: the regularisation strength (TRL's ``beta`` for ``loss_type="ipo"``).

    Raises:
        ValueError: if ``tau <= 0``.
    """

    needs_reference = True

    def __init__(self, tau: float = 0.1) -> None:
        super().__init__()
        _check_positive("tau", tau)
        self.tau = float(tau)

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: Optional[torch.Tensor],
        ref_rejected_logps: Optional[torch.Tensor],
        chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor,
    ) -> Pair:
        """Arguments and returns as :meth:`DPOLoss.forward`; the lengths are used."""
        _require_reference("IPOLoss", ref_chosen_logps, ref_rejected_logps)
        chosen_ratio = policy_chosen_logps - ref_chosen_logps
        rejected_ratio = policy_rejected_logps - ref_rejected_logps
        # An empty response (everything truncated) counts as one token, as in TRL.
        d = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(
            min=1
        )
        losses = (d - 1 / (2 * self.tau)) ** 2
        return losses, self.tau * chosen_ratio.detach(), self.tau * rejected_ratio.detach()


class SimPOLoss(nn.Module):
    """Simple Preference Optimization (Meng et al. 2024): reference-free, length-normalised.

    With ``ac = pc / n_c`` and ``ar = pr / n_r`` the average log-probabilities per scored
    token, a pair's loss is ``-log sigmoid(beta * (ac - ar) - gamma)``; the rewards are
    ``beta * ac`` and ``beta * ar``. Reference arguments are ignored (``needs_reference`` is
    False, so recipes skip the reference forward).

    Args:
        beta: the reward scale (the paper uses 2.0 to 2.5).
        gamma: the target reward margin (the paper's ``gamma``, not TRL's ``gamma / beta``).

    Raises:
        ValueError: if ``beta <= 0``.
    """

    needs_reference = False

    def __init__(self, beta: float = 2.0, gamma: float = 0.5) -> None:
        super().__init__()
        _check_positive("beta", beta)
        self.beta = float(beta)
        self.gamma = float(gamma)

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        ref_chosen_logps: Optional[torch.Tensor],
        ref_rejected_logps: Optional[torch.Tensor],
        chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor,
    ) -> Pair:
        """Arguments and returns as :meth:`DPOLoss.forward`; the reference ones are unused."""
        chosen_avg = policy_chosen_logps / chosen_lengths.clamp(min=1)
        rejected_avg = policy_rejected_logps / rejected_lengths.clamp(min=1)
        losses = -F.logsigmoid(self.beta * (chosen_avg - rejected_avg) - self.gamma)
        return losses, self.beta * chosen_avg.detach(), self.beta * rejected_avg.detach()
