import pytest

from socialmae import PRESETS, SocialMAEConfig, get_preset


def test_presets_describe_the_published_models():
    paper = get_preset("social-mae-base")
    assert paper.video_grid == (4, 14, 14) and paper.num_video_tokens == 784
    assert paper.audio_grid == (8, 64) and paper.num_audio_tokens == 512
    assert paper.video_patch_dim == 1536 and paper.audio_patch_dim == 256
    cav = get_preset("cav-mae-base")
    assert cav.num_video_tokens == 196 and cav.video_patch_dim == 768
    assert cav.norm_pix_loss and not cav.trainable_pos_embed
    assert (cav.fbank_mean, cav.fbank_std) == (-5.081, 4.4849)
    assert set(PRESETS) >= {"social-mae-base", "cav-mae-base", "tiny"}


def test_overrides_and_round_trip():
    cfg = get_preset("tiny", num_frames=4, embed_dim=128, num_heads=8)
    assert cfg.video_grid == (2, 14, 14)
    assert SocialMAEConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_frames": 7}, "num_frames 7 not divisible by tubelet_size 2"),
        ({"embed_dim": 100}, "embed_dim 100 not divisible by num_heads 12"),
        ({"image_size": 200}, "image_size 200 not divisible"),
        ({"patch_size": 0}, "patch_size must be positive"),
        ({"channel_order": "BRG"}, "channel_order"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_preset("social-mae-base", **overrides)


def test_unknown_names_are_refused():
    with pytest.raises(KeyError, match="unknown preset 'vit-huge'"):
        get_preset("vit-huge")
    with pytest.raises(TypeError, match="unknown SocialMAEConfig field"):
        get_preset("tiny", embed_dimension=3)
