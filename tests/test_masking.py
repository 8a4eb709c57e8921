import pytest
import torch

from socialmae.model.masking import (
    kept_count,
    random_masking,
    structured_audio_masking,
    unshuffle,
)


def _tokens(b=4, n=784, d=6):
    return torch.arange(b * n * d, dtype=torch.float32).reshape(b, n, d)


def test_random_masking_invariants(generator):
    x = _tokens()
    out = random_masking(x, 0.75, generator)
    keep = kept_count(784, 0.75)
    assert keep == 196
    assert out.visible.shape == (4, keep, 6)
    assert torch.equal(out.mask.sum(1), torch.full((4,), 784.0 - keep))  # same count per sample
    for b in range(4):
        kept_ids = (out.mask[b] == 0).nonzero().squeeze(1)
        # the visible tokens are exactly the unmasked ones
        assert torch.equal(out.visible[b].sort(0).values, x[b, kept_ids].sort(0).values)
    # samples get different masks
    assert not torch.equal(out.mask[0], out.mask[1])


def test_masking_is_reproducible_with_a_generator():
    x = _tokens()
    a = random_masking(x, 0.75, torch.Generator().manual_seed(7))
    b = random_masking(x, 0.75, torch.Generator().manual_seed(7))
    c = random_masking(x, 0.75, torch.Generator().manual_seed(8))
    assert torch.equal(a.mask, b.mask) and torch.equal(a.visible, b.visible)
    assert not torch.equal(a.mask, c.mask)


def test_unshuffle_puts_visible_tokens_back(generator):
    x = _tokens()
    out = random_masking(x, 0.5, generator)
    token = torch.full((1, 1, 6), -1.0)
    full = unshuffle(out.visible, out.ids_restore, token)
    kept = out.mask == 0
    assert torch.equal(full[kept], x[kept])
    assert torch.all(full[~kept] == -1.0)


def test_ratio_zero_keeps_everything_and_bad_ratios_fail(generator):
    out = random_masking(_tokens(), 0.0, generator)
    assert out.mask.sum() == 0 and out.visible.shape[1] == 784
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="mask ratio"):
            random_masking(_tokens(), bad, generator)


@pytest.mark.parametrize("mode", ["time", "freq", "tf"])
def test_structured_audio_masking_prefers_whole_lines(mode, generator):
    x = _tokens(n=512)
    out = structured_audio_masking(x, 0.75, (8, 64), mode, generator)
    assert torch.equal(out.mask.sum(1), torch.full((4,), 512.0 - 128))
    grid = out.mask.reshape(4, 8, 64)
    full_cols = (grid.sum(1) == 8).sum(1)  # fully masked time columns per sample
    full_rows = (grid.sum(2) == 64).sum(1)
    if mode == "time":
        assert torch.all(full_cols >= 48)
    elif mode == "freq":
        assert torch.all(full_rows >= 6)
    else:  # 33 columns and 4 rows chosen; their union (388) exceeds the 384 to remove by 4
        assert torch.all((grid.sum(1) >= 4).sum(1) >= int(64 * 0.75 * 0.7))
        assert torch.all((grid.sum(2) >= 60).sum(1) >= 4)


def test_structured_masking_rejects_wrong_grid(generator):
    with pytest.raises(ValueError, match="grid"):
        structured_audio_masking(_tokens(n=500), 0.75, (8, 64), "time", generator)
