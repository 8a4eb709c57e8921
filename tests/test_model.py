import pytest
import torch
from tests_helpers import tiny_inputs

from socialmae import LossWeights, SocialMAE, SocialMAEClassifier
from socialmae.losses import masked_reconstruction_loss
from socialmae.model.layers import patchify_audio, patchify_video, reference_video_token_index

UNUSED_NORMS = ("norm1_a", "norm1_v", "norm2_a", "norm2_v")


def test_parameter_counts_match_the_released_models():
    assert sum(p.numel() for p in SocialMAE.from_preset("social-mae-base").parameters()) == (
        192_772_608
    )
    assert sum(p.numel() for p in SocialMAE.from_preset("cav-mae-base").parameters()) == (
        191_036_160
    )
    head = SocialMAEClassifier.from_preset("social-mae-base", num_outputs=6)
    assert sum(p.numel() for p in head.parameters()) == 165_543_168 + 769 * 6


@pytest.mark.parametrize("overrides", [{}, {"num_frames": 1, "tubelet_size": 1}])
def test_pretraining_step_reaches_every_trainable_parameter(overrides):
    model = SocialMAE.from_preset("tiny", **overrides)
    audio, video = tiny_inputs(frames=model.config.num_frames)
    out = model(audio, video, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    no_grad = [
        n for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)
    ]  # fmt: skip
    assert no_grad == []
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    # only the _a/_v norms of blocks that never see a single modality are frozen
    assert frozen and all(n.split(".")[2] in UNUSED_NORMS for n in frozen)
    assert not any(n.startswith("blocks_u") for n in frozen)


def test_forward_outputs_and_losses_agree_with_the_pure_functions():
    model = SocialMAE.from_preset("tiny")
    audio, video = tiny_inputs()
    out = model(audio, video, 0.75, 0.5, generator=torch.Generator().manual_seed(3))
    assert out.pred_audio.shape == (2, 512, 256) and out.pred_video.shape == (2, 784, 1536)
    assert out.mask_audio.sum(1).tolist() == [384, 384]
    assert out.mask_video.sum(1).tolist() == [392, 392]
    loss_v = masked_reconstruction_loss(
        out.pred_video, patchify_video(video, 2, 16), out.mask_video
    )
    loss_a = masked_reconstruction_loss(out.pred_audio, patchify_audio(audio, 16), out.mask_audio)
    torch.testing.assert_close(out.loss_mae_video, loss_v)
    torch.testing.assert_close(out.loss_mae_audio, loss_a)
    expected = loss_a + loss_v + 0.01 * out.loss_contrastive
    torch.testing.assert_close(out.loss, expected)
    assert 0.0 <= out.contrastive_accuracy.item() <= 1.0


def test_masks_are_reproducible_and_weights_can_switch_branches_off():
    model = SocialMAE.from_preset("tiny")
    audio, video = tiny_inputs()
    first = model(audio, video, generator=torch.Generator().manual_seed(5))
    again = model(audio, video, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first.mask_video, again.mask_video) and first.loss == again.loss
    no_decoder = model(audio, video, weights=LossWeights(mae=0.0, contrastive=1.0))
    assert no_decoder.pred_audio is None and no_decoder.loss == no_decoder.loss_contrastive
    no_contrast = model(audio, video, weights=LossWeights(contrastive=0.0))
    assert no_contrast.loss_contrastive.item() == 0.0


def test_video_target_is_in_token_order_and_legacy_switch_permutes_it():
    model = SocialMAE.from_preset("tiny")
    tg, hg, wg = model.config.video_grid
    index = torch.arange(tg * hg * wg, dtype=torch.float32).reshape(tg, hg, wg)
    video = index.repeat_interleave(2, 0).repeat_interleave(16, 1).repeat_interleave(16, 2)
    video = video[None, None].expand(1, 3, -1, -1, -1)
    target = model.video_target(video)[0, :, 0]  # value of each target patch
    assert torch.equal(target, torch.arange(784.0))
    legacy = SocialMAE.from_preset("tiny", legacy_target_order=True).video_target(video)[0, :, 0]
    assert torch.equal(legacy, reference_video_token_index((tg, hg, wg)).float())


def test_reconstruction_keeps_visible_patches():
    model = SocialMAE.from_preset("tiny").eval()
    audio, video = tiny_inputs(batch=1)
    rec = model.reconstruct(audio, video, generator=torch.Generator().manual_seed(0))
    assert rec.video_reconstructed.shape == video.shape
    assert rec.audio_reconstructed.shape == audio.shape
    visible = rec.video_masked != 0
    assert torch.equal(rec.video_reconstructed[visible], video[visible])
    assert (rec.video_masked == 0).float().mean().item() == pytest.approx(0.75, abs=0.01)
    assert not torch.equal(rec.video_reconstructed, rec.video_masked)


def test_classifier_modes_and_embeddings():
    model = SocialMAEClassifier.from_preset("tiny", num_outputs=6).eval()
    audio, video = tiny_inputs(batch=3)
    assert model(audio, video).shape == (3, 6)
    assert model(audio, None, mode="audio").shape == (3, 6)
    assert model(None, video, mode="video").shape == (3, 6)
    feats = model.features(audio, video, "multimodal")
    assert feats.tokens.shape == (3, 512 + 784, 64) and feats.pooled.shape == (3, 64)
    assert model.features(audio, None, "audio").tokens.shape == (3, 512, 64)
    assert model.features(None, video, "video").tokens.shape == (3, 784, 64)
    torch.testing.assert_close(model.embed(audio, video), feats.tokens.mean(1))
    # audio mode does not look at the video
    torch.testing.assert_close(model(audio, None, "audio"), model(audio, video * 0, "audio"))


def test_video_centering_sees_motion_not_appearance(tmp_path):
    """With ``video_centering_gain`` the model is blind to a face's still appearance (a
    picture added to every frame) and sees its motion, in embeddings and in the pretraining
    loss alike; the gain is saved with the model; without it the frames go in as they are."""
    audio, video = tiny_inputs(batch=2)
    appearance = torch.randn(2, 3, 1, 224, 224, generator=torch.Generator().manual_seed(1))
    still = video + appearance  # same motion, another face
    model = SocialMAE.from_preset("tiny", video_centering_gain=4.0).eval()
    torch.testing.assert_close(model.video_input(video).mean(dim=2), torch.zeros(2, 3, 224, 224))
    torch.testing.assert_close(model.embed(None, still, "video"), model.embed(None, video, "video"))
    same = [model(audio, v, generator=torch.Generator().manual_seed(0)) for v in (video, still)]
    torch.testing.assert_close(same[0].loss_mae_video, same[1].loss_mae_video)
    moved = video.roll(1, dims=2)  # other motion
    assert not torch.allclose(model.embed(None, moved, "video"), model.embed(None, video, "video"))
    model.save_pretrained(tmp_path / "m")
    assert SocialMAE.from_pretrained(tmp_path / "m").config.video_centering_gain == 4.0
    plain = SocialMAE.from_preset("tiny").eval()
    assert plain.video_input(video) is video
    assert not torch.allclose(plain.embed(None, still, "video"), plain.embed(None, video, "video"))
    for bad in ({"video_centering_gain": 0.0}, {"video_centering_gain": 2.0, "num_frames": 1,
                                                  "tubelet_size": 1}):  # fmt: skip
        with pytest.raises(ValueError, match="video_centering_gain"):
            SocialMAE.from_preset("tiny", **bad)


def test_pretraining_and_classifier_share_the_encoder():
    pre = SocialMAE.from_preset("tiny").eval()
    clf = SocialMAEClassifier.from_preset("tiny", num_outputs=2).eval()
    missing, unexpected = clf.load_state_dict(pre.state_dict(), strict=False)
    assert set(missing) == {"mlp_head.0.weight", "mlp_head.0.bias", "mlp_head.1.weight",
                            "mlp_head.1.bias"}  # fmt: skip
    assert all(k.startswith(("decoder", "mask_token")) for k in unexpected)
    audio, video = tiny_inputs()
    for mode in ("multimodal", "audio", "video"):
        torch.testing.assert_close(pre.embed(audio, video, mode), clf.embed(audio, video, mode))


def test_bad_inputs_fail_with_the_expected_shape():
    model = SocialMAEClassifier.from_preset("tiny", num_outputs=2)
    audio, video = tiny_inputs()
    with pytest.raises(ValueError, match=r"audio must be \[B, 1024, 128\]"):
        model(audio[:, :1000], video)
    with pytest.raises(ValueError, match=r"video must be \[B, 3, 8, 224, 224\]"):
        model(audio, video.permute(0, 2, 1, 3, 4))
    with pytest.raises(ValueError, match="batch sizes differ"):
        model(audio[:1], video)
    with pytest.raises(ValueError, match="mode must be one of"):
        model(audio, video, mode="both")
    with pytest.raises(ValueError, match="needs both"):
        model(audio, None)
    with pytest.raises(ValueError, match="labels"):
        SocialMAEClassifier.from_preset("tiny", num_outputs=2, labels=("a",))
    with pytest.raises(ValueError, match="task"):
        SocialMAEClassifier.from_preset("tiny", num_outputs=2, task="ranking")


def test_sdpa_switch_gives_the_same_model_output():
    model = SocialMAE.from_preset("tiny").eval()
    audio, video = tiny_inputs()
    fast = model(audio, video, generator=torch.Generator().manual_seed(0))
    model.set_sdpa(False)
    slow = model(audio, video, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fast.pred_video, slow.pred_video, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.loss, slow.loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("setting", ["decoder", "encoder", "all"])
def test_activation_checkpointing_recomputes_with_the_same_losses_and_gradients(setting):
    torch.manual_seed(0)
    plain = SocialMAE.from_preset("tiny")
    recomputing = SocialMAE.from_preset("tiny", activation_checkpointing=setting)
    recomputing.load_state_dict(plain.state_dict())
    audio, video = tiny_inputs(2)
    calls = {"decoder": 0, "encoder": 0}

    def count(group):
        def hook(module, args):
            calls[group] += 1

        return hook

    recomputing.decoder_blocks[0].register_forward_pre_hook(count("decoder"))
    recomputing.blocks_a[0].register_forward_pre_hook(count("encoder"))
    outs = []
    for model in (plain, recomputing):
        out = model(audio, video, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        outs.append(out)
    for name in ("loss", "loss_mae_audio", "loss_mae_video", "loss_contrastive"):
        assert torch.equal(getattr(outs[0], name), getattr(outs[1], name)), name
    grads = dict(recomputing.named_parameters())
    for name, param in plain.named_parameters():
        if param.grad is None:
            assert grads[name].grad is None, name
        else:
            assert torch.equal(param.grad, grads[name].grad), name
    # the checkpointed blocks ran again in backward, the others once
    assert calls["decoder"] == (2 if setting in ("decoder", "all") else 1)
    assert calls["encoder"] == (2 if setting in ("encoder", "all") else 1)


def test_activation_checkpointing_setting_is_checked():
    with pytest.raises(ValueError, match="activation_checkpointing"):
        SocialMAE.from_preset("tiny", activation_checkpointing="some")
