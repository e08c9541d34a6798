import torch

from megaflow.algorithms.losses import clipped_surrogate


def test_clipped_surrogate_values_and_stats():
    logp_old = torch.zeros(4)
    logp_new = torch.log(torch.tensor([1.0, 1.5, 0.5, 1.05]))
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    loss, stats = clipped_surrogate(logp_new, logp_old, adv, clip_range=0.2)
    # r=1: -A; r=1.5, A>0: clipped to 1.2 -> max(-1.5, -1.2) = -1.2; r=0.5, A<0: max(0.5, 0.8) = 0.8;
    # r=1.05 (inside), A=-2: 2.1
    torch.testing.assert_close(loss, torch.tensor([-1.0, -1.2, 0.8, 2.1]))
    assert stats["clipped"].tolist() == [False, True, True, False]
    torch.testing.assert_close(stats["ratio"], torch.tensor([1.0, 1.5, 0.5, 1.05]))
    torch.testing.assert_close(stats["approx_kl"], 0.5 * logp_new**2)


def test_clipped_branch_has_no_gradient():
    logp_new = torch.tensor([0.5, 0.01], requires_grad=True)
    loss, _ = clipped_surrogate(logp_new, torch.zeros(2), torch.tensor([1.0, 1.0]), clip_range=0.1)
    loss.sum().backward()
    assert logp_new.grad[0] == 0 and logp_new.grad[1] != 0
