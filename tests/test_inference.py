"""Predictor: real video files in, predictions and embeddings out; bad files become rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from media import write_clip

from socialmae.checkpoints import CheckpointError
from socialmae.data.crop import CropParams
from socialmae.data.errors import MediaError
from socialmae.data.inputs import load_clip
from socialmae.data.sampling import ClipSampling
from socialmae.inference import (
    NEEDS,
    PREPROCESSING_NAME,
    Predictor,
    read_preprocessing,
    write_preprocessing,
)
from socialmae.model import SocialMAE, SocialMAEClassifier
from socialmae.tasks import EMOTIONS, TRAITS


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("media")
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 200)
    return {
        "face": write_clip(root / "face.mp4", seconds=2.0),
        "face_long": write_clip(root / "face_long.mkv", seconds=3.0),
        "no_face": write_clip(root / "no_face.mp4", seconds=1.0, faces=0),
        "corrupt": corrupt,
        "missing": root / "missing.mp4",
    }


def _reference(predictor: Predictor, path: Path, mode: str = "multimodal") -> torch.Tensor:
    """What the model outputs for one clip, computed by hand: ``[K]``."""
    pre = predictor.preprocessing
    clip = load_clip(path, pre.config, pre.crop, pre.sampling, need=NEEDS[mode])
    audio = clip.audio[None] if mode != "video" else None
    video = clip.video[None] if mode != "audio" else None
    with torch.no_grad():
        return predictor.model(audio, video, mode)[0]


def test_predict_mixes_good_and_bad_files(classifier_dir, media):
    predictor = Predictor.load(classifier_dir)
    paths = [
        media["face"],
        media["corrupt"],
        media["face_long"],
        media["missing"],
        media["no_face"],
    ]
    predictions = predictor.predict(paths, batch_size=2)

    assert [p.path for p in predictions] == [str(p) for p in paths]
    assert [p.ok for p in predictions] == [True, False, True, False, False]
    for bad in ("corrupt", "missing", "no_face"):
        with pytest.raises(MediaError) as raised:
            load_clip(media[bad], predictor.preprocessing.config)
        assert predictions[paths.index(media[bad])].error == raised.value.reason
    assert "no face detected" in predictions[4].error
    for good in (predictions[0], predictions[2]):
        assert set(good.scores) == set(EMOTIONS)
        assert sum(good.scores.values()) == pytest.approx(1.0, abs=1e-5)
        assert good.label == max(good.scores, key=good.scores.get)
    expected = _reference(predictor, media["face"]).softmax(-1)
    got = torch.tensor([predictions[0].scores[name] for name in EMOTIONS])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_batch_size_and_frame(classifier_dir, media):
    predictor = Predictor.load(classifier_dir)
    paths = [media["face"], media["corrupt"], media["face_long"]]
    one = predictor.predict_frame(paths, batch_size=1)
    three = predictor.predict_frame(paths, batch_size=3)
    assert list(one.columns) == ["path", "label", "error", *(f"prob_{e}" for e in EMOTIONS)]
    np.testing.assert_allclose(
        one[predictor.score_columns].to_numpy(), three[predictor.score_columns].to_numpy(),
        atol=1e-5, equal_nan=True,
    )  # fmt: skip
    assert one["label"].tolist()[1] is None and one["error"].tolist()[0] is None
    assert one.loc[1, predictor.score_columns].isna().all()


def test_each_mode_needs_only_its_own_streams(classifier_dir, media, tmp_path):
    """A voice-only file (or a face clip without a face) in audio mode, a silent face clip in
    video mode; multimodal still needs both."""
    voice = write_clip(tmp_path / "voice.mp4", video=False)
    mute = write_clip(tmp_path / "mute.mp4", audio_rate=None)
    predictor = Predictor.load(classifier_dir)
    (heard,) = predictor.predict([voice], mode="audio")
    (blank,) = predictor.predict([media["no_face"]], mode="audio")
    (seen,) = predictor.predict([mute], mode="video")
    assert heard.error is None and blank.error is None and seen.error is None
    assert heard.label in EMOTIONS and seen.label in EMOTIONS
    both = predictor.predict([voice, mute, media["no_face"]], mode="multimodal")
    assert [p.error for p in both] == ["no video stream", "no audio stream",
                                       both[2].error]  # fmt: skip
    assert "no face" in both[2].error
    (wrong,) = predictor.predict([voice], mode="video")
    assert wrong.error == "no video stream"


@pytest.mark.parametrize("mode", ["audio", "video"])
def test_unimodal_modes_match_the_model(classifier_dir, media, mode):
    predictor = Predictor.load(classifier_dir)
    (prediction,) = predictor.predict([media["face"]], mode=mode)
    got = torch.tensor([prediction.scores[name] for name in EMOTIONS])
    torch.testing.assert_close(got, _reference(predictor, media["face"], mode).softmax(-1),
                               atol=1e-5, rtol=1e-4)  # fmt: skip


def test_regression_scores_are_raw_outputs(tmp_path, media):
    model = SocialMAEClassifier.from_preset("tiny", num_outputs=5, task="regression",
                                            labels=TRAITS)  # fmt: skip
    model.save_pretrained(tmp_path / "regressor")
    predictor = Predictor.load(tmp_path / "regressor")
    (prediction, bad) = predictor.predict([media["face"], media["corrupt"]])
    assert prediction.label is None and set(prediction.scores) == set(TRAITS)
    expected = _reference(predictor, media["face"])
    got = torch.tensor([prediction.scores[name] for name in TRAITS])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    frame = predictor.to_frame([prediction, bad])
    assert [c for c in frame.columns if c.startswith("score_")] == [f"score_{t}" for t in TRAITS]
    assert frame["error"].tolist()[1] == bad.error


def test_embed_aligned_with_inputs(classifier_dir, media):
    predictor = Predictor.load(classifier_dir)
    out = predictor.embed([media["corrupt"], media["face"]], mode="audio", batch_size=4)
    assert out.vectors.shape == (2, predictor.model.config.embed_dim)
    assert out.vectors.dtype == np.float32
    assert out.ok.tolist() == [False, True] and out.errors[1] is None
    assert np.isnan(out.vectors[0]).all()
    pre = predictor.preprocessing
    clip = load_clip(media["face"], pre.config, pre.crop, pre.sampling, need="audio")
    with torch.no_grad():
        expected = predictor.model.embed(clip.audio[None], None, "audio")[0]
    np.testing.assert_allclose(out.vectors[1], expected.numpy(), atol=1e-5, rtol=1e-4)


def test_stored_preprocessing_and_overrides(tmp_path, classifier_dir, media):
    directory = tmp_path / "model"
    directory.mkdir()
    for f in classifier_dir.iterdir():
        (directory / f.name).write_bytes(f.read_bytes())
    crop = CropParams(margin=0.4, workers=4, device="cpu")
    sampling = ClipSampling(window_seconds=2.0, audio_window="clip")
    write_preprocessing(directory, crop, sampling)
    assert read_preprocessing(directory) == (crop, sampling)

    predictor = Predictor.load(directory, fbank_stats=(-4.0, 3.0))
    pre = predictor.preprocessing
    assert pre.sampling == sampling
    assert pre.crop.margin == 0.4 and pre.crop.workers == 1  # runtime knobs reset
    assert (pre.config.fbank_mean, pre.config.fbank_std) == (-4.0, 3.0)
    default = Predictor.load(classifier_dir)
    assert default.preprocessing.sampling == ClipSampling()
    assert default.preprocessing.config == default.model.config  # statistics of config.json
    a = predictor.predict([media["face_long"]])[0].scores
    b = default.predict([media["face_long"]])[0].scores
    assert a != b  # the stored window, crop and statistics are what the model sees

    (directory / PREPROCESSING_NAME).write_text(json.dumps({"crop": {"margin": "wide"}}))
    with pytest.raises(CheckpointError, match=r"crop\.margin"):
        Predictor.load(directory)


def test_official_finetuned_checkpoint(official_file, media):
    path, _ = official_file(kind="finetune", d=64, depth=2, label_dim=3)
    labels = ("neutral", "smile", "laughter")
    predictor = Predictor.load(path, task="classification", labels=labels)
    assert predictor.labels == labels
    assert predictor.preprocessing.config.channel_order == "BGR"  # the reference's frames
    (prediction,) = predictor.predict([media["face"]])
    assert prediction.ok and set(prediction.scores) == set(labels)
    unnamed = Predictor.load(path)
    assert unnamed.labels == ("output_0", "output_1", "output_2")


def test_rejects_what_it_cannot_use(tmp_path, classifier_dir, media):
    SocialMAE.from_preset("tiny").save_pretrained(tmp_path / "pretrain")
    with pytest.raises(CheckpointError, match="pretraining"):
        Predictor.load(tmp_path / "pretrain")
    predictor = Predictor.load(classifier_dir)
    with pytest.raises(ValueError, match="mode"):
        predictor.predict([media["face"]], mode="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        predictor.embed([media["face"]], batch_size=0)
    with pytest.raises(ValueError, match="image_size"):
        Predictor.load(classifier_dir, crop=CropParams(image_size=112))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            Predictor.load(classifier_dir, device="cuda")
    assert predictor.predict([]) == []
    assert predictor.embed([]).vectors.shape == (0, predictor.model.config.embed_dim)


@pytest.mark.gpu
def test_cuda_matches_cpu(classifier_dir, media):
    cpu = Predictor.load(classifier_dir).predict([media["face"]])[0]
    gpu = Predictor.load(classifier_dir, device="cuda").predict([media["face"]])[0]
    for name in EMOTIONS:
        assert gpu.scores[name] == pytest.approx(cpu.scores[name], abs=1e-3)


def test_each_predictor_owns_its_detector(classifier_dir):
    """Two predictors with other detector settings do not share (or inherit) a detector."""
    strict = Predictor.load(classifier_dir, crop=CropParams(workers=1, detector_confidence=0.9))
    loose = Predictor.load(classifier_dir, crop=CropParams(workers=1, detector_confidence=0.3))
    assert strict.detector is strict.detector  # built once per predictor
    assert strict.detector is not loose.detector
    assert (strict.detector.confidence, loose.detector.confidence) == (0.9, 0.3)
