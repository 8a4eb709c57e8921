import math

import pytest
import torch

from socialmae.losses import (
    LossWeights,
    contrastive_loss,
    masked_reconstruction_loss,
    normalize_patches,
    total_loss,
)


def test_reconstruction_counts_only_removed_patches():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [2.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third patch is visible: ignored
    # per-patch MSE: 1, (4 + 16) / 2 = 10 -> mean over removed = 5.5
    assert masked_reconstruction_loss(pred, target, mask).item() == pytest.approx(5.5)


def test_normalised_targets():
    target = torch.tensor([[[1.0, 3.0]]])  # mean 2, unbiased var 2
    expected = torch.tensor([[[-1.0, 1.0]]]) / math.sqrt(2 + 1e-6)
    torch.testing.assert_close(normalize_patches(target), expected)
    loss = masked_reconstruction_loss(torch.zeros(1, 1, 2), target, torch.ones(1, 1), True)
    assert loss.item() == pytest.approx(1.0 / (2 + 1e-6), rel=1e-6)


def test_contrastive_matches_hand_computation():
    audio = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    video = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    a = audio / audio.norm(dim=1, keepdim=True)
    v = video / video.norm(dim=1, keepdim=True)
    s = a @ v.T / 0.05
    # reference: -mean_j log_softmax(S, dim=0)[j, j]
    expected = -(torch.log_softmax(s, 0).diag()).mean()
    loss, acc = contrastive_loss(audio, video)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # column 0: audio 0 scores 20 vs 0 -> right; column 1: audio 1 scores 14.1 vs 14.1 (tie)
    assert acc.item() in (0.5, 1.0)
    s01 = 1 / math.sqrt(2) / 0.05
    by_hand = 0.5 * (
        -(20 - math.log(math.exp(20) + math.exp(0)))
        - (s01 - math.log(math.exp(s01) + math.exp(s01)))
    )
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)


def test_bidirectional_averages_both_directions():
    g = torch.Generator().manual_seed(0)
    audio, video = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    one, _ = contrastive_loss(audio, video)
    other, _ = contrastive_loss(video, audio)  # audio-to-video direction
    both, _ = contrastive_loss(audio, video, bidirectional=True)
    assert both.item() == pytest.approx(0.5 * (one.item() + other.item()), rel=1e-5)


def test_contrastive_with_extra_negatives():
    g = torch.Generator().manual_seed(0)
    video = torch.randn(3, 8, generator=g)
    audio = torch.cat([torch.randn(4, 8, generator=g), video * 5, torch.randn(2, 8, generator=g)])
    loss, acc = contrastive_loss(audio, video, temperature=0.05, offset=4)
    assert acc.item() == 1.0 and loss.item() < 1e-3


def test_total_and_weights():
    w = LossWeights(mae=2.0, contrastive=0.5)
    total = total_loss(torch.tensor(1.0), torch.tensor(3.0), torch.tensor(4.0), w)
    assert total.item() == 2.0 * 4 + 0.5 * 4
    assert LossWeights() == LossWeights(mae=1.0, contrastive=0.01, temperature=0.05)
    with pytest.raises(ValueError):
        LossWeights(temperature=0)
    with pytest.raises(ValueError):
        LossWeights(contrastive=-1)
