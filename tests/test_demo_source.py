"""The embedded demo dataset: real faces, espeak-ng speech, mouths that follow the voice."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest

from socialmae.data.decode import decode_audio, iter_frames
from socialmae.data.manifest import read_manifest
from socialmae.data.sources import demo
from socialmae.data.sources.splits import assign_speaker_splits, check_disjoint
from socialmae.tasks import EMOTIONS

FPS = 25
SECONDS = 2.0


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """24 clips: 4 identities, each saying one sentence in all 6 emotions, 2 s each."""
    out = tmp_path_factory.mktemp("demo_small")
    frame = demo.prepare_demo(out, identities=4, sentences=1, seconds=SECONDS, seed=0)
    return out, frame


@pytest.fixture(scope="module")
def learnable(small: tuple[Path, pd.DataFrame]) -> pd.DataFrame:
    """The small set: every identity speaks every emotion once."""
    return small[1]


def _frames(path: str) -> np.ndarray:
    """Decoded video as gray float32 ``[T, H, W]``."""
    return np.stack([f for _, f in iter_frames(path, FPS)]).astype(np.float32).mean(-1)


def test_manifest(small: tuple[Path, pd.DataFrame]) -> None:
    out, frame = small
    assert len(frame) == 24
    assert set(frame["dataset"]) == {"demo"}
    assert frame["label"].value_counts().to_dict() == dict.fromkeys(EMOTIONS, 4)
    # as in CREMA-D: every identity says its sentence in every emotion
    per_identity = frame.groupby("speaker")["label"].apply(lambda x: sorted(x)).tolist()
    assert per_identity == [sorted(EMOTIONS)] * 4
    sentences = frame.groupby("speaker")["extra"].apply(lambda x: {e["sentence"] for e in x})
    assert sentences.map(len).eq(1).all()
    assert sorted(frame["speaker"].unique()) == sorted(demo.identity_names(4))
    assert check_disjoint(frame) == []
    per_split = frame.groupby("split")["speaker"].nunique().to_dict()
    assert per_split == {"train": 2, "val": 1, "test": 1}
    assert all((out / p).is_file() for p in frame["path"])
    assert all(Path(p).is_file() for p in frame["abs_path"])
    assert read_manifest(out)["clip_id"].tolist() == frame["clip_id"].tolist()
    for extra in frame["extra"]:
        assert extra["sentence"] in demo.SENTENCES.values()
        assert 0 <= extra["pitch"] <= 100 and 80 <= extra["rate"] <= 300
    assert not list((out / "clips").glob("*tmp*"))


def test_decoded_streams(small: tuple[Path, pd.DataFrame]) -> None:
    path = small[1]["abs_path"].iloc[0]
    with av.open(path) as container:
        assert len(container.streams.video) == 1 and len(container.streams.audio) == 1
        video, audio = container.streams.video[0], container.streams.audio[0]
        assert (video.codec_context.width, video.codec_context.height) == (224, 224)
        assert video.codec_context.name == "h264" and float(video.average_rate) == FPS
        assert audio.codec_context.name == "aac"
        assert audio.codec_context.sample_rate == 16_000 and audio.codec_context.channels == 1
    frames = _frames(path)
    assert abs(len(frames) - SECONDS * FPS) <= 1
    samples = decode_audio(path)
    assert abs(samples.size / 16_000 - SECONDS) < 0.1
    assert np.sqrt(np.mean(samples**2)) > 0.01


def test_mouth_follows_loudness(small: tuple[Path, pd.DataFrame]) -> None:
    """On the clips whose head stays still (neutral, disgust: no nod, shake, tilt or tremor),
    the darkness between the lips follows the loudness of the voice."""
    correlations = []
    still = small[1][small[1]["label"].isin(["neutral", "disgust"])]
    for path, speaker in zip(still["abs_path"], still["speaker"], strict=True):
        layout = demo.face_layout(speaker)
        (mx, my), h = layout.mouth_center, layout.face_height
        frames = _frames(path)
        mouth = frames[:, int(my) : int(my + 0.12 * h), int(mx - 0.3 * h) : int(mx + 0.3 * h)]
        darkness = 255.0 - mouth.mean(axis=(1, 2))
        loudness = demo.frame_loudness(decode_audio(path), FPS, len(frames))
        correlations.append(np.corrcoef(darkness, loudness)[0, 1])
    assert min(correlations) > 0.2, correlations


def test_deterministic(small: tuple[Path, pd.DataFrame], tmp_path: Path) -> None:
    out, frame = small
    again = demo.prepare_demo(tmp_path, identities=4, sentences=1, seconds=SECONDS, seed=0)
    columns = ["clip_id", "path", "speaker", "split", "label"]
    pd.testing.assert_frame_equal(frame[columns], again[columns])
    assert frame["extra"].tolist() == again["extra"].tolist()
    for path in frame["path"]:
        a, b = str(out / path), str(tmp_path / path)
        np.testing.assert_array_equal(decode_audio(a), decode_audio(b))
        np.testing.assert_array_equal(_frames(a), _frames(b))
    other = demo.demo_specs(4, 1, SECONDS, seed=1)
    assert [s.seed for s in other] != [s.seed for s in demo.demo_specs(4, 1, SECONDS, seed=0)]


def test_speech_is_deterministic_and_labelled() -> None:
    kwargs = {"voice": "en-us+f3", "pitch": 60, "range_": 80, "rate": 190, "volume": 150}
    a = demo.synthesize_speech("Don't forget a jacket", seed=3, **kwargs)
    demo.synthesize_speech("The surface is slick", voice="en-us+m3", seed=4)
    b = demo.synthesize_speech("Don't forget a jacket", seed=3, **kwargs)
    np.testing.assert_array_equal(a, b)
    fixed = demo.synthesize_speech("Don't forget a jacket", seconds=1.5, lead=0.2)
    assert fixed.shape == (24_000,) and fixed.dtype == np.float32
    assert np.abs(fixed[:3000]).max() == 0 and np.abs(fixed).max() > 0.05


def _audio_features(audio: np.ndarray, sr: int = 16_000) -> np.ndarray:
    """Loudness, median log F0, F0 spread, syllable rate: ``[4]``."""
    hop, win = 160, 640
    n = (audio.size - win) // hop
    frames = audio[np.arange(win)[None] + hop * np.arange(n)[:, None]]
    rms = np.sqrt((frames**2).mean(1))
    voiced = rms > 0.25 * rms.max()
    lo, hi = sr // 450, sr // 60
    f0 = []
    for f in frames[voiced][::2]:
        f = f - f.mean()
        ac = np.correlate(f, f, "full")[win - 1 :]
        ac = ac / (ac[0] + 1e-9)
        lag = lo + int(np.argmax(ac[lo:hi]))
        if ac[lag] > 0.5:
            f0.append(sr / lag)
    logf0 = np.log(np.array(f0)) if f0 else np.zeros(1)
    env = np.convolve(rms, np.ones(5) / 5, "same")
    peaks = np.sum((env[1:-1] > env[:-2]) & (env[1:-1] >= env[2:]) & (env[1:-1] > 0.3 * env.max()))
    on = np.nonzero(voiced)[0]
    span = (on[-1] - on[0] + 1) * hop / sr
    spread = np.percentile(logf0, 90) - np.percentile(logf0, 10)
    return np.array([np.log(np.percentile(rms, 95)), np.median(logf0), spread, peaks / span])


def _shifts(profiles: np.ndarray) -> np.ndarray:
    """Sub-pixel displacement of each 1-D profile ``[T, L]`` against the first: ``[T]``."""
    ref = profiles[0] - profiles[0].mean()
    out = []
    for q in profiles:
        c = np.correlate(q - q.mean(), ref, "full")
        k = int(np.argmax(c))
        d = 0.0
        if 0 < k < len(c) - 1:
            d = (c[k - 1] - c[k + 1]) / (2 * (c[k - 1] - 2 * c[k] + c[k + 1]) + 1e-9)
        out.append(k + d - (len(ref) - 1))
    return np.array(out)


def _video_features(path: str, layout: demo.FaceLayout) -> np.ndarray:
    """Log of: head shake, nod and jitter, brow, eye and mouth change from the first frames,
    overall change, cheek change, head displacement: ``[9]``."""
    v = _frames(path)
    sx, sy = _shifts(v.mean(1)), _shifts(v.mean(2))
    h = layout.face_height
    (ex, ey), (mx, my) = layout.eyes.mean(0), layout.mouth_center
    late = v[-20:].mean(0) - v[:3].mean(0)  # the expression has set in vs. its onset

    def change(cx: float, cy: float, w: float, hh: float) -> float:
        return float(np.abs(late[int(cy - hh) : int(cy + hh), int(cx - w) : int(cx + w)]).mean())

    features = [
        np.abs(np.diff(sx)).mean(),
        np.abs(np.diff(sy)).mean(),
        np.abs(np.diff(sx, 2)).mean() + np.abs(np.diff(sy, 2)).mean(),
        change(ex, ey - 0.13 * h, 0.3 * h, 0.06 * h),
        change(ex, ey, 0.3 * h, 0.05 * h),
        change(mx, my, 0.3 * h, 0.06 * h),
        np.abs(late).mean(),
        sum(change(mx + d * h, my - 0.1 * h, 0.12 * h, 0.1 * h) for d in (-0.2, 0.2)),
        abs(sx[-20:].mean() - sx[:3].mean()) + abs(sy[-20:].mean() - sy[:3].mean()),
    ]
    return np.log1p(np.array(features))


def _loo_nearest_centroid(features: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out accuracy of a nearest-centroid classifier on z-scored features."""
    x = (features - features.mean(0)) / (features.std(0) + 1e-9)
    hits = 0
    for i in range(len(labels)):
        keep = np.arange(len(labels)) != i
        classes = sorted(set(labels[keep]))
        centroids = np.stack([x[keep][labels[keep] == c].mean(0) for c in classes])
        hits += classes[int(np.argmin(((centroids - x[i]) ** 2).sum(1)))] == labels[i]
    return hits / len(labels)


def test_labels_learnable_from_audio(learnable: pd.DataFrame) -> None:
    feats = np.stack([_audio_features(decode_audio(p)) for p in learnable["abs_path"]])
    labels, speakers = learnable["label"].to_numpy(), learnable["speaker"].to_numpy()
    loud = dict(zip(learnable["clip_id"], feats[:, 0], strict=True))
    anger = [loud[c] for c, lab in zip(learnable["clip_id"], labels, strict=True) if lab == "anger"]
    sad = [loud[c] for c, lab in zip(learnable["clip_id"], labels, strict=True) if lab == "sadness"]
    assert min(anger) > max(sad)
    for speaker in set(speakers):  # speaker normalisation, as usual for emotion recognition
        feats[speakers == speaker] -= feats[speakers == speaker].mean(0)
    assert _loo_nearest_centroid(feats, labels) >= 0.5  # chance: 1/6


def test_labels_learnable_from_video(learnable: pd.DataFrame) -> None:
    feats = np.stack(
        [
            _video_features(p, demo.face_layout(s))
            for p, s in zip(learnable["abs_path"], learnable["speaker"], strict=True)
        ]
    )
    speakers = learnable["speaker"].to_numpy()
    for speaker in set(speakers):  # as for audio: each face's own neutral point
        feats[speakers == speaker] -= feats[speakers == speaker].mean(0)
    assert _loo_nearest_centroid(feats, learnable["label"].to_numpy()) >= 0.6  # chance: 1/6


def test_faces_fill_the_frame() -> None:
    for name in demo.identity_names(len(demo.IDENTITIES)):
        layout = demo.face_layout(name, 224)
        assert layout.image.shape == (224, 224, 3)
        x, y, w, h = layout.box
        assert 0.4 <= h / 224 <= 0.6 and 0.3 <= w / 224 <= 0.6
        assert x > 0 and x + w < 224 and y > -0.5 and y + h < 224
        assert layout.mouth_center[1] > layout.eyes[:, 1].mean() + 0.2 * h


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="identities"):
        demo.prepare_demo(tmp_path, identities=len(demo.IDENTITIES) + 1)
    with pytest.raises(ValueError, match="sentences"):
        demo.prepare_demo(tmp_path, sentences=0)


def test_splits_hold_out_identities_with_both_voice_kinds() -> None:
    specs = demo.demo_specs(identities=16, sentences=1)
    assert len(specs) == 96 and len({s.clip_id for s in specs}) == 96
    names = demo.identity_names(16)
    kinds = {n: demo.voice_kind(n) for n in names}
    assert list(kinds.values()).count("male") == 8
    for seed in range(3):
        split = assign_speaker_splits(names, (0.625, 0.1875, 0.1875), seed, kinds)
        sizes = {s: sorted(kinds[n] for n in names if split[n] == s) for s in set(split.values())}
        assert {s: len(k) for s, k in sizes.items()} == {"train": 10, "val": 3, "test": 3}
        assert all({"male", "female"} <= set(k) for k in sizes.values()), sizes


def test_a_smaller_set_in_the_same_place_drops_the_clips_it_no_longer_has(tmp_path: Path) -> None:
    demo.prepare_demo(tmp_path, identities=4, sentences=1, seconds=1.0)
    frame = demo.prepare_demo(tmp_path, identities=3, sentences=1, seconds=1.0)
    assert sorted(p.name for p in (tmp_path / "clips").iterdir()) == sorted(
        Path(p).name for p in frame["path"]
    )


def test_generation_logs_its_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Progress goes to the log, so that a piped `make demo` shows it too."""
    caplog.set_level("INFO", logger="socialmae.data.sources.demo")
    demo.prepare_demo(tmp_path, identities=3, sentences=1, seconds=1.0)
    lines = [r.getMessage() for r in caplog.records if "clips generated" in r.getMessage()]
    assert lines[-1] == "demo: 18/18 clips generated" and len(lines) >= 9
