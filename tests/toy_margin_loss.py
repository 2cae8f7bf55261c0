"""A toy loss added the way any loss is: this file, and one ``register`` line (in the test)."""

import torch


def toy_margin_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths, *,
                    beta: float = 1.0, margin: float = 1.0):
    """``relu(margin - β(a_w - a_l))²`` with ``a`` the length-averaged log-probs, averaged over pairs."""
    gap = beta * (policy_chosen_logps / chosen_lengths - policy_rejected_logps / rejected_lengths)
    losses = torch.relu(margin - gap) ** 2
    return losses.mean(), {"toy/gap": gap.detach().mean()}
