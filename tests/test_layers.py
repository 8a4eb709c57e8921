import pytest
import torch
import torch.nn.functional as F

from socialmae.model.layers import (
    Attention,
    patchify_audio,
    patchify_video,
    reference_video_token_index,
    sincos_1d,
    sincos_2d,
    sincos_3d,
    unpatchify_audio,
    unpatchify_video,
)


def test_audio_patchify_matches_the_reference_convolution():
    """Linear over patchify == the reference Conv2d over the transposed fbank."""
    g = torch.Generator().manual_seed(0)
    fbank = torch.randn(2, 1024, 128, generator=g)
    weight = torch.randn(8, 1, 16, 16, generator=g)
    conv = F.conv2d(fbank.unsqueeze(1).transpose(2, 3), weight, stride=16)  # [B, 8, 8, 64]
    conv = conv.flatten(2).transpose(1, 2)  # [B, 512, 8] frequency-major
    linear = patchify_audio(fbank, 16) @ weight.reshape(8, -1).T
    torch.testing.assert_close(linear, conv, rtol=1e-4, atol=1e-4)


def test_video_patchify_matches_the_reference_conv3d_up_to_token_order():
    g = torch.Generator().manual_seed(0)
    video = torch.randn(1, 3, 8, 64, 48, generator=g)
    weight = torch.randn(5, 3, 16, 16, 2, generator=g)  # reference kernel axes (c, H, W, T)
    ref = F.conv3d(video.permute(0, 1, 3, 4, 2), weight, stride=(16, 16, 2))
    ref = ref.flatten(2).transpose(1, 2)  # [1, L, 5] in (h, w, t) order
    ours = patchify_video(video, 2, 16) @ weight.permute(0, 4, 2, 3, 1).reshape(5, -1).T
    index = reference_video_token_index((4, 4, 3))
    torch.testing.assert_close(ours, ref[:, index], rtol=1e-4, atol=1e-4)


def test_each_video_token_holds_its_own_tubelet():
    """A clip whose tubelets encode their (t, h, w) index: token i is exactly tubelet i."""
    tg, hg, wg, s, p = 4, 3, 5, 2, 16
    index = torch.arange(tg * hg * wg, dtype=torch.float32).reshape(tg, hg, wg)
    video = index.repeat_interleave(s, 0).repeat_interleave(p, 1).repeat_interleave(p, 2)
    video = video[None, None].expand(2, 3, -1, -1, -1)  # [2, 3, 8, 48, 80]
    tokens = patchify_video(video, s, p)
    assert tokens.shape == (2, tg * hg * wg, s * p * p * 3)
    expected = torch.arange(tg * hg * wg, dtype=torch.float32)[None, :, None].expand_as(tokens)
    assert torch.equal(tokens, expected)


def test_per_token_layout_is_frames_rows_columns_channels():
    video = torch.zeros(1, 3, 2, 16, 16)
    video[0, 2, 1, 3, 5] = 1.0  # channel 2, frame 1, row 3, column 5
    flat = patchify_video(video, 2, 16)[0, 0]
    assert flat.nonzero().item() == ((1 * 16 + 3) * 16 + 5) * 3 + 2


def test_patchify_round_trips():
    g = torch.Generator().manual_seed(1)
    fbank = torch.randn(2, 1024, 128, generator=g)
    assert torch.equal(unpatchify_audio(patchify_audio(fbank, 16), 16, 1024), fbank)
    video = torch.randn(2, 3, 8, 32, 48, generator=g)
    tokens = patchify_video(video, 2, 16)
    assert torch.equal(unpatchify_video(tokens, 2, 16, (4, 2, 3)), video)


def test_reference_token_index_is_a_permutation():
    index = reference_video_token_index((4, 14, 14))
    assert torch.equal(index.sort().values, torch.arange(784))
    # our token (t=1, h=0, w=0) is the reference's token (h=0, w=0, t=1)
    assert index[196].item() == 1
    # our token (t=0, h=1, w=2) is the reference's (h=1, w=2, t=0) = 1 * 56 + 2 * 4
    assert index[14 + 2].item() == 64


def test_sincos_tables_encode_every_axis():
    pos = sincos_3d(64, 4, 3, 5)
    assert pos.shape == (60, 64)
    assert torch.unique(pos, dim=0).shape[0] == 60  # every (t, h, w) distinct
    # moving along one axis changes only that axis' slice of the width
    t_step = pos.reshape(4, 3, 5, 64)[1, 0, 0] - pos.reshape(4, 3, 5, 64)[0, 0, 0]
    assert t_step[:16].abs().sum() > 0 and t_step[16:].abs().sum() == 0
    grid = sincos_2d(32, 8, 64)
    assert grid.shape == (512, 32) and torch.unique(grid, dim=0).shape[0] == 512
    assert torch.allclose(sincos_1d(8, torch.zeros(1)), torch.tensor([[0.0] * 4 + [1.0] * 4]))
    with pytest.raises(ValueError, match="even"):
        sincos_1d(7, torch.arange(3))


def test_sdpa_equals_manual_attention():
    torch.manual_seed(0)
    attn = Attention(64, 4)
    x = torch.randn(3, 50, 64)
    fast = attn(x)
    attn.use_sdpa = False
    slow = attn(x)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_mlp_backward_equals_autograd(dtype):
    from socialmae.model.layers import Mlp

    torch.manual_seed(0)
    mlp = Mlp(16, 48).to(dtype)
    x = torch.randn(2, 7, 16, dtype=dtype, requires_grad=True)
    lean = mlp(x)
    lean.pow(2).sum().backward()
    lean_grads = [x.grad.clone()] + [p.grad.clone() for p in mlp.parameters()]
    x.grad = None
    mlp.zero_grad()
    plain = mlp.fc2(F.gelu(mlp.fc1(x)))
    plain.pow(2).sum().backward()
    plain_grads = [x.grad] + [p.grad for p in mlp.parameters()]
    torch.testing.assert_close(lean, plain)
    for a, b in zip(lean_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(
            lambda h: mlp(h), (torch.randn(3, 16, dtype=dtype, requires_grad=True),)
        )
