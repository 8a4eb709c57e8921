import pickle
from pathlib import Path

import pytest
import torch
from reference_oracle import reference_features
from tests_helpers import tiny_inputs

from socialmae import CheckpointError, SocialMAE, SocialMAEClassifier, load_checkpoint
from socialmae.checkpoints import initialize_from, native_to_official, read_official
from socialmae.model.layers import patchify_video, reference_video_token_index

SMALL = dict(d=64, depth=2, dd=32, decoder_depth=1)  # official layout, small widths


@pytest.mark.parametrize(
    "family, kind, tensors, params",
    [
        ("social-mae", "pretrain", 647, 192_772_608),
        ("social-mae", "finetune", 478, 165_543_168 + 769 * 6),
        ("cav-mae", "pretrain", 647, 191_036_160),
        # 588 fewer positions x 768 and a one-frame kernel (589,824 fewer weights)
        ("cav-mae", "finetune", 478, 165_543_168 - 588 * 768 - 589_824 + 769 * 6),
    ],
)
@pytest.mark.parametrize("prefix", ["module.", ""])
def test_released_checkpoints_load_strictly(official_file, family, kind, tensors, params, prefix):
    path, sd = official_file(family=family, kind=kind, prefix=prefix)
    assert len(sd) == tensors  # the published key list
    model = load_checkpoint(path)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == params
    assert isinstance(model, SocialMAE if kind == "pretrain" else SocialMAEClassifier)
    frames = 8 if family == "social-mae" else 1
    assert model.config.num_frames == frames and model.config.embed_dim == 768
    if kind == "finetune":
        assert model.num_outputs == 6
    # every tensor made it in: exporting gives back the file's tensors exactly
    exported = native_to_official(model)
    assert exported.keys() == {k.removeprefix("module.") for k in sd}
    for key, value in sd.items():
        assert torch.equal(exported[key.removeprefix("module.")], value), key


@pytest.mark.parametrize("family", ["social-mae", "cav-mae"])
@pytest.mark.parametrize("mode", ["multimodal", "audio", "video"])
def test_encoder_matches_the_reference_forward(official_file, family, mode):
    path, sd = official_file(family=family, kind="finetune", label_dim=3, prefix="", **SMALL)
    model = load_checkpoint(path, task="regression")
    frames = model.config.num_frames
    audio, video = tiny_inputs(batch=2, frames=frames, seed=4)
    with torch.no_grad():
        ours = model.features(audio, video, mode).tokens
        ref = reference_features(sd, audio, video, mode, heads=1, depth=2)
    index = reference_video_token_index(model.config.video_grid)
    if mode != "audio":  # reference video tokens are (h, w, t): reorder them to ours
        offset = 512 if mode == "multimodal" else 0
        ref = torch.cat([ref[:, :offset], ref[:, offset:][:, index]], dim=1)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert model.task == "regression"


def test_encoder_matches_the_reference_at_the_paper_size(official_file):
    path, sd = official_file(family="social-mae", kind="finetune", prefix="")
    model = load_checkpoint(path)
    audio, video = tiny_inputs(batch=1)
    with torch.no_grad():
        ours = model.embed(audio, video)
        ref = reference_features(sd, audio, video, "multimodal", heads=12, depth=11).mean(1)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_official_social_mae_records_its_preprocessing(official_file):
    path, _ = official_file(**SMALL)
    ckpt = read_official(path)
    assert (ckpt.family, ckpt.kind) == ("social-mae", "pretrain")
    assert ckpt.config.channel_order == "BGR"
    assert (ckpt.config.fbank_mean, ckpt.config.fbank_std) == (-6.2943, 12.26344)
    assert ckpt.config.trainable_pos_embed and not ckpt.config.norm_pix_loss


def _corrupt(tmp_path: Path, official_file) -> dict[str, tuple[Path, str]]:
    path, sd = official_file(**SMALL)
    cases: dict[str, tuple[Path, str]] = {}
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    cases["empty"] = (empty, "file is empty")
    cut = tmp_path / "truncated.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    cases["truncated"] = (cut, "truncated or not a torch checkpoint")
    noise = tmp_path / "noise.pth"
    noise.write_bytes(torch.randint(0, 255, (4096,), dtype=torch.uint8).numpy().tobytes())
    cases["noise"] = (noise, "not a torch checkpoint")
    cases["missing"] = (tmp_path / "nope.pth", "no such file")
    extra = tmp_path / "extra.pth"
    torch.save({**sd, "module.surprise": torch.zeros(3)}, extra)
    cases["unexpected key"] = (extra, r"unexpected 1 tensor\(s\): \['surprise'\]")
    gone = tmp_path / "gone.pth"
    torch.save({k: v for k, v in sd.items() if not k.endswith("blocks_v.1.mlp.fc2.bias")}, gone)
    cases["missing key"] = (gone, r"missing 1 tensor\(s\): \['blocks_v.1.mlp.fc2.bias'\]")
    shape = tmp_path / "shape.pth"
    torch.save({**sd, "module.decoder_pred_a.weight": torch.zeros(255, 32)}, shape)
    cases["shape"] = (shape, r"decoder_pred_a.weight: checkpoint \[255, 32\] vs model \[256, 32\]")
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, other)
    cases["other model"] = (other, "not a Social-MAE/CAV-MAE checkpoint")
    not_tensors = tmp_path / "numbers.pth"
    torch.save({"epoch": 3}, not_tensors)
    cases["not tensors"] = (not_tensors, "not a state dict of tensors")
    return cases


def test_unusable_files_raise_a_clear_error(tmp_path, official_file):
    for name, (path, message) in _corrupt(tmp_path, official_file).items():
        with pytest.raises(CheckpointError, match=message) as info:
            load_checkpoint(path)
        assert info.value.path == str(path), name


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickled_code_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = str(marker)
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"x": payload}, f)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def test_save_and_load_pretrained_round_trip(tmp_path):
    model = SocialMAEClassifier.from_preset(
        "tiny", num_outputs=3, task="classification", labels=("smile", "laugh", "neutral")
    ).eval()
    target = tmp_path / "ckpt"
    model.save_pretrained(target)
    model.save_pretrained(target)  # overwriting an existing directory works
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary leftovers
    loaded = SocialMAEClassifier.from_pretrained(target)
    assert loaded.labels == ("smile", "laugh", "neutral") and loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    audio, video = tiny_inputs()
    assert torch.equal(loaded(audio, video), model(audio, video))
    assert isinstance(load_checkpoint(target), SocialMAEClassifier)
    with pytest.raises(TypeError, match="not a SocialMAE"):
        SocialMAE.from_pretrained(target)
    (target / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_checkpoint(target)


def test_cav_mae_initialises_social_mae_with_an_inflated_video_kernel(official_file):
    path, _ = official_file(family="cav-mae", **SMALL)
    cav = load_checkpoint(path)
    social = SocialMAE(cav.config.replace(num_frames=8, tubelet_size=2, trainable_pos_embed=True))
    report = initialize_from(social, path)
    assert set(report.inflated) == {
        "patch_embed_v.proj.weight", "pos_embed_v", "decoder_pos_embed_v",
        "decoder_pred_v.weight", "decoder_pred_v.bias",
    }  # fmt: skip
    assert report.fresh == [] and report.unused == []
    assert len(report.loaded) == len(social.state_dict()) - 5
    # a still clip gives the tubelet the CAV-MAE frame response
    frame = torch.randn(1, 3, 1, 224, 224)
    still = frame.expand(1, 3, 8, 224, 224)
    with torch.no_grad():
        cav_tokens = cav.patch_embed_v(patchify_video(frame, 1, 16))  # [1, 196, D]
        social_tokens = social.patch_embed_v(patchify_video(still, 2, 16))  # [1, 784, D]
    for t in range(4):
        torch.testing.assert_close(social_tokens[:, t * 196 : (t + 1) * 196], cav_tokens)
    # the first tubelet keeps CAV-MAE's positions, later ones differ
    assert torch.equal(social.pos_embed_v[:, :196], cav.pos_embed_v)
    assert not torch.allclose(social.pos_embed_v[:, 196:392], cav.pos_embed_v)
    # and the result still trains
    audio, video = tiny_inputs(batch=2)
    social(audio, video).loss.backward()


def test_initialise_classifier_from_pretraining_reports_the_new_head(tmp_path):
    pre = SocialMAE.from_preset("tiny")
    pre.save_pretrained(tmp_path / "pre")
    clf = SocialMAEClassifier.from_preset("tiny", num_outputs=4)
    report = initialize_from(clf, tmp_path / "pre")
    assert sorted(report.fresh) == sorted(
        ["mlp_head.0.weight", "mlp_head.0.bias", "mlp_head.1.weight", "mlp_head.1.bias"]
    )
    assert "mask_token" in report.unused and report.inflated == []
    assert torch.equal(clf.blocks_u[0].attn.qkv.weight, pre.blocks_u[0].attn.qkv.weight)
