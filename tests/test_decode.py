"""Decoding, fbank, tracking and shards on real media files (no face detector needed)."""

import logging
import os
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from media import CODECS, write_clip

from socialmae.data.decode import decode_audio, iter_frames, probe
from socialmae.data.errors import MediaError
from socialmae.data.face_tracks import smooth_square_boxes, square_crop, track_main_face
from socialmae.data.features import fbank, frames_to_video, log_mel, rms_db, torch_threads
from socialmae.data.shards import (
    ShardReader,
    ShardSample,
    decode_jpeg,
    decode_sample,
    encode_jpeg,
    write_shard,
)


@pytest.mark.parametrize("suffix", sorted(CODECS))
def test_every_container_decodes_to_16k_mono_and_sampled_frames(tmp_path, suffix):
    path = write_clip(tmp_path / f"clip{suffix}", seconds=2.0)
    info = probe(path)
    assert info.has_audio and info.has_video and info.width == 224
    audio = decode_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.size / 16_000 - 2.0) < 0.12
    assert rms_db(audio) > -30
    frames = list(iter_frames(path, rate=4.0))
    assert [round(t, 2) for t, _ in frames][:8] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert frames[0][1].shape == (224, 224, 3) and frames[0][1].dtype == np.uint8


def test_resampling_and_downmix(tmp_path):
    path = write_clip(tmp_path / "stereo48k.mp4", audio_rate=48_000, channels=2)
    assert probe(path).sample_rate == 48_000 and probe(path).channels == 2
    audio = decode_audio(path)
    assert abs(audio.size - 32_000) < 800  # 2 s at 16 kHz
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16_000 / audio.size - 220) < 5  # the tone survived
    low = write_clip(tmp_path / "8k.mkv", audio_rate=8_000)
    assert abs(decode_audio(low).size - 32_000) < 800


def test_variable_frame_rate_uses_timestamps(tmp_path):
    path = write_clip(tmp_path / "vfr.mkv", seconds=2.0, vfr=True, fps=25)
    times = [t for t, _ in iter_frames(path, rate=4.0)]
    assert times == pytest.approx([k * 0.25 for k in range(len(times))])
    assert 1.9 <= len(times) * 0.25 <= 4.1  # covers the clip's span, not its frame count


@pytest.mark.parametrize("suffix, vfr", [(s, False) for s in sorted(CODECS)] + [(".mkv", True)])
def test_seeking_decodes_fewer_frames_and_yields_the_same(tmp_path, caplog, suffix, vfr):
    """Keyframes every 10 frames, a target every 25: the decoder jumps over most frames."""
    path = write_clip(tmp_path / f"gop{suffix}", seconds=4.0, gop=10, numbered=True, vfr=vfr)
    with caplog.at_level(logging.DEBUG, logger="socialmae.data.decode"):
        in_order = list(iter_frames(path, rate=1.0, seek=False))
        jumping = list(iter_frames(path, rate=1.0))
    assert [t for t, _ in jumping] == [t for t, _ in in_order]
    assert len(in_order) >= 4
    for (time, expected), (_, frame) in zip(in_order, jumping, strict=True):
        assert np.array_equal(frame, expected), f"{suffix}: frame at {time} s differs"
    (full, no_jumps), (fewer, jumps) = re.findall(r"decoded (\d+) frames, (\d+) jumps", caplog.text)
    assert no_jumps == "0" and int(jumps) >= 3, caplog.text
    assert int(fewer) <= 0.5 * int(full), caplog.text


def test_a_keyframe_that_never_comes_out_falls_back_to_decoding_in_order(tmp_path, monkeypatch):
    """An index naming keyframes where no frame is shown, just after the frames due at 0.5 and
    1.0 s (0.48 and 0.96 s at 25 fps): the decoder starts over from the beginning and the frames
    are still the right ones."""
    import socialmae.data.decode as decode

    path = write_clip(tmp_path / "gop.mp4", seconds=3.0, gop=10, numbered=True)
    in_order = list(iter_frames(path, rate=2.0, seek=False))
    times, _ = decode._packet_times(path)
    monkeypatch.setattr(decode, "_packet_times", lambda _: (times, [0.0, 0.49, 0.97]))
    restarted = list(iter_frames(path, rate=2.0))
    assert len(restarted) == len(in_order)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(in_order, restarted, strict=True))


def test_huge_frames_are_scaled_down_and_long_clips_capped(tmp_path):
    path = write_clip(tmp_path / "big.mp4", size=(1920, 1080), seconds=1.0, fps=5)
    _, frame = next(iter_frames(path, rate=2.0, max_side=640))
    assert frame.shape == (360, 640, 3)
    long = write_clip(tmp_path / "long.mkv", seconds=6.0, fps=5, size=(64, 64))
    assert len(list(iter_frames(long, rate=2.0, max_seconds=2.0))) == 4  # 0, .5, 1, 1.5
    assert decode_audio(long, max_seconds=2.0).size == 32_000


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "file is empty"),
        (lambda p: p.write_bytes(np.random.default_rng(0).bytes(5000)), "not a readable media"),
        (lambda p: None, "no such file"),
    ],
)
def test_unreadable_files(tmp_path, make, reason):
    path = tmp_path / "bad.mp4"
    make(path)
    with pytest.raises(MediaError, match=reason) as info:
        probe(path)
    assert info.value.path == str(path)


def test_truncated_and_streamless_files(tmp_path):
    good = write_clip(tmp_path / "good.mp4", seconds=2.0)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(MediaError):
        probe(cut)  # mp4 keeps its index at the end: half a file has none
    cut_mkv = tmp_path / "cut.mkv"
    full = write_clip(tmp_path / "full.mkv", seconds=2.0)
    cut_mkv.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    frames = list(iter_frames(cut_mkv, rate=4.0))  # streamable: the first half decodes
    assert 1 <= len(frames) < 8
    silent_video = write_clip(tmp_path / "video-only.mp4", audio_rate=None)
    with pytest.raises(MediaError, match="no audio stream"):
        decode_audio(silent_video)
    audio_only = write_clip(tmp_path / "audio-only.mkv", video=False)
    with pytest.raises(MediaError, match="no video stream"):
        next(iter_frames(audio_only, rate=4.0))


def test_fbank_matches_the_reference_recipe():
    t = np.arange(16_000 * 3) / 16_000
    wave = (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    feats = fbank(wave)
    assert feats.shape == (1024, 128)
    assert torch.all(feats[300:] == 0)  # 3 s = 298 frames, then zero padding
    peak_bin = feats[:290].mean(0).argmax().item()
    # Kaldi mel: 1127 ln(1 + f/700); 128 bins between 20 Hz and 8 kHz are 21.77 mel apart,
    # bin i centred at mel(20) + (i + 1) * 21.77; 440 Hz = 549.7 mel -> bin 22.8
    assert peak_bin in (22, 23)
    assert fbank(wave[:100]).shape == (1024, 128)  # shorter than one window still works


def test_video_normalisation_and_channel_order():
    frames = np.zeros((8, 4, 4, 3), dtype=np.uint8)
    frames[..., 0] = 255  # pure red
    rgb = frames_to_video(frames, "RGB")
    bgr = frames_to_video(frames, "BGR")
    assert rgb.shape == (3, 8, 4, 4)
    assert rgb[0].mean().item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)
    assert bgr[2].mean().item() == pytest.approx((1 - 0.406) / 0.225, rel=1e-5)
    with pytest.raises(ValueError):
        frames_to_video(frames, "RBG")


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_video_is_the_normalised_bytes_exactly(order):
    """Every byte value of every channel, cut, mirrored or not: the numbers of
    ``(x / 255 - mean) / std`` computed in float32 in the model's layout, bit for bit."""
    frames = np.random.default_rng(4).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    frames[0, :16, :16] = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1, 1)
    for region, flip in ((None, False), ((5, 7, 40), True)):
        pixels = torch.from_numpy(frames)
        if region is not None:
            pixels = pixels[:, 7:47, 5:45]
        if flip:
            pixels = pixels.flip(2)
        channels = pixels.permute(3, 0, 1, 2).float()
        if order == "BGR":
            channels = channels.flip(0)
        expected = (channels / 255.0 - mean) / std
        video = frames_to_video(frames, order, region=region, flip=flip)
        assert video.is_contiguous() and torch.equal(video, expected)


@dataclass
class Box:
    bbox: tuple[float, float, float, float]
    score: float = 0.99


def test_tracking_prefers_the_persistent_central_face_and_fills_gaps():
    main = Box((80, 60, 160, 140))
    passer = Box((0, 0, 30, 30))
    detections = [[main, passer], [passer], [Box((82, 62, 162, 142)), passer], [main]]
    boxes, detected = track_main_face(detections, (224, 224))
    assert detected.tolist() == [True, False, True, True]
    assert boxes[0].tolist() == [80, 60, 160, 140]
    squares = smooth_square_boxes(boxes, detected, window=1)
    assert squares[1].tolist() == pytest.approx([121, 101, 80])  # interpolated
    smooth = smooth_square_boxes(boxes, detected, window=3)
    assert smooth.shape == (4, 3) and np.all(np.abs(smooth[:, 2] - 80) < 1e-9)
    none, found = track_main_face([[], []], (10, 10))
    assert not found.any() and np.isnan(none).all()


def test_square_crop_pads_outside_the_frame():
    frame = np.full((100, 100, 3), 200, dtype=np.uint8)
    crop = square_crop(frame, np.array([10.0, 50.0, 40.0]), margin=0.0, size=32)
    assert crop.shape == (32, 32, 3)
    assert crop[:, :4].mean() < 20 and crop[:, -8:].mean() > 180  # black where outside


def test_shards_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    samples = [
        ShardSample(
            meta={"clip_id": f"clip.{k}", "times": [0.0, 0.25], "label": "anger"},
            audio=rng.uniform(-0.5, 0.5, 16_000).astype(np.float32),
            frames=[
                encode_jpeg(np.full((224, 224, 3), 40 * k + i, dtype=np.uint8)) for i in (0, 9)
            ],
        )
        for k in range(3)
    ]
    assert write_shard(tmp_path / "shard-00000.tar", samples) == 3
    reader = ShardReader(tmp_path / "shard-00000.tar")
    assert len(reader) == 3 and set(reader.index) == {"clip.0", "clip.1", "clip.2"}
    assert reader.meta("clip.2")["frames"] == 2 and reader.meta("clip.2")["label"] == "anger"
    np.testing.assert_allclose(reader.audio("clip.1"), samples[1].audio, atol=1 / 32767)
    assert abs(int(reader.frame("clip.2", 1).mean()) - 89) <= 2
    assert not list(tmp_path.glob(".*"))  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    mode = (tmp_path / "shard-00000.tar").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask  # readable by other users and nodes, as any output (not 0600)
    (tmp_path / "broken.tar").write_bytes(b"x" * 700)
    with pytest.raises(MediaError, match=r"broken\.tar"):
        ShardReader(tmp_path / "broken.tar")


def test_webdataset_reads_one_whole_sample_per_clip(tmp_path):
    """The shards are WebDataset shards: the library yields exactly one sample per clip, with
    every member, equal to what our random-access reader returns."""
    import webdataset as wds

    rng = np.random.default_rng(1)
    samples = [
        ShardSample(
            meta={"clip_id": f"id.{k}/x", "times": [0.0, 0.25, 0.5], "label": "fear"},
            audio=rng.uniform(-0.5, 0.5, 8_000 + 100 * k).astype(np.float32),
            frames=[encode_jpeg(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in "abc"],
        )
        for k in range(4)
    ]
    path = tmp_path / "shard-00000.tar"
    write_shard(path, samples)
    reader = ShardReader(path)
    read = list(wds.WebDataset(str(path), shardshuffle=False))
    assert len(read) == len(samples) == len(reader)
    for raw in read:
        members = {k for k in raw if not k.startswith("__")}
        assert members == {"json", "wav", "fbank.npy", "frames.mp"}
        sample = decode_sample(raw, raw["__url__"])
        ours = reader.sample(sample.meta["clip_id"])
        assert sample.meta == ours.meta and sample.frames == ours.frames
        np.testing.assert_array_equal(sample.audio, ours.audio)
        np.testing.assert_array_equal(sample.fbank, ours.fbank)
        np.testing.assert_array_equal(sample.fbank, reader.fbank(sample.meta["clip_id"]))
        first = reader.frame(sample.meta["clip_id"], 0)
        np.testing.assert_array_equal(first, decode_jpeg(sample.frames[0]))
    # its own decoders understand every member without ours
    decoded = next(iter(wds.WebDataset(str(path), shardshuffle=False).decode()))
    assert decoded["json"]["clip_id"] == "id.0/x" and len(decoded["frames.mp"]) == 3
    assert decoded["fbank.npy"].shape == (1 + (8_000 - 400) // 160, 128)


def test_shards_store_the_fbank_of_the_stored_audio(tmp_path):
    """Each sample carries the log-mel of its 16-bit audio, computed on one thread: the same
    bytes whatever the writer's thread count; the loader cuts windows from it."""
    audio = np.random.default_rng(2).uniform(-0.6, 0.6, 40_123).astype(np.float32)
    sample = ShardSample({"clip_id": "a"}, audio, [b"x"])
    for threads in (1, 2, 3):
        with torch_threads(threads):
            write_shard(tmp_path / f"threads-{threads}.tar", [sample])
    written = {(tmp_path / f"threads-{n}.tar").read_bytes() for n in (1, 2, 3)}
    assert len(written) == 1
    reader = ShardReader(tmp_path / "threads-1.tar")
    with torch_threads(1):
        expected = log_mel(reader.audio("a")).numpy()
    assert expected.shape == (1 + (40_123 - 400) // 160, 128)
    np.testing.assert_array_equal(reader.fbank("a"), expected)
    with pytest.raises(MediaError, match=r"x\.tar.*undecodable sample"):
        decode_sample({"json": b"{}", "wav": b"", "fbank.npy": b"not npy", "frames.mp": b"\x90"},
                      "x.tar")  # fmt: skip


def test_a_sample_missing_a_member_is_named(tmp_path):
    import tarfile

    path = tmp_path / "shard-00000.tar"
    write_shard(path, [ShardSample({"clip_id": "a"}, np.zeros(800, np.float32), [b"x"])])
    broken = tmp_path / "broken.tar"
    with tarfile.open(path) as src, tarfile.open(broken, "w") as dst:
        for info in src:
            if not info.name.endswith(".wav"):
                dst.addfile(info, src.extractfile(info))
    with pytest.raises(MediaError, match=r"broken\.tar.*000000.*lacks wav"):
        ShardReader(broken)
    with pytest.raises(MediaError, match="sample without wav"):
        decode_sample({"json": b"{}", "fbank.npy": b"", "frames.mp": b"\x90"}, "s")


def test_jpeg_decoding_gives_pillows_pixels():
    """The loader decodes with torchvision (faster); the pixels are Pillow's, byte for byte."""
    import io

    from PIL import Image

    rng = np.random.default_rng(3)
    smooth = np.linspace(0, 255, 112 * 112 * 3).reshape(112, 112, 3).astype(np.uint8)
    for image in (rng.integers(0, 256, (112, 112, 3), dtype=np.uint8), smooth):
        for quality in (60, 90):
            data = encode_jpeg(image, quality)
            pillow = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            np.testing.assert_array_equal(decode_jpeg(data), pillow)
    gray = io.BytesIO()
    Image.fromarray(smooth[..., 0]).save(gray, format="JPEG")
    assert decode_jpeg(gray.getvalue()).shape == (112, 112, 3)  # grey JPEGs come back RGB


@pytest.mark.parametrize("samples", [10, 399, 401, 16_000, 64_000])
def test_log_mel_is_kaldis_fbank_exactly(samples):
    """log_mel keeps Kaldi's window and filterbank between calls; the numbers are torchaudio's
    ``kaldi.fbank`` with the reference's settings, bit for bit."""
    import torchaudio

    wave = np.random.default_rng(samples).uniform(-0.5, 0.5, samples).astype(np.float32)
    for bins in (128, 64):
        centred = torch.as_tensor(wave).reshape(1, -1)
        centred = centred - centred.mean()
        if centred.shape[1] < 400:
            centred = torch.nn.functional.pad(centred, (0, 400 - centred.shape[1]))
        expected = torchaudio.compliance.kaldi.fbank(
            centred, htk_compat=True, sample_frequency=16_000, use_energy=False,
            window_type="hanning", num_mel_bins=bins, dither=0.0, frame_shift=10,
        )  # fmt: skip
        assert torch.equal(log_mel(wave, bins), expected)
