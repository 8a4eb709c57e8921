"""RetinaFace: ONNX conversion parity, detection on real photos, weights loading and caching."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from socialmae.data import faces
from socialmae.data.faces import DetectorWeightsError, Face, FaceDetector, RetinaFace


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(faces.CACHE_ENV, str(root))
        yield root


@pytest.fixture(scope="module")
def detector(cache: Path) -> FaceDetector:
    return FaceDetector()


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # [512, 512, 3]


@pytest.fixture(scope="module")
def hopper() -> np.ndarray:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return np.asarray(Image.open(f).convert("RGB"))  # [600, 512, 3]


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def _contains(face: Face, point: tuple[float, float]) -> bool:
    x1, y1, x2, y2 = face.bbox
    return x1 <= point[0] <= x2 and y1 <= point[1] <= y2


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("size", [(512, 512), (250, 333)])
def test_onnx_parity(detector: FaceDetector, astronaut: np.ndarray, size: tuple[int, int]) -> None:
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        faces.read_bundled_onnx(), options, providers=["CPUExecutionProvider"]
    )
    graph_input = session.get_inputs()[0]
    assert graph_input.shape[1] == 3  # [batch, 3, height, width], dynamic otherwise
    height, width = size
    image = _resize(astronaut, width, height)
    x = torch.from_numpy(image[..., ::-1].copy()).permute(2, 0, 1).float()[None]
    x = x - torch.tensor(faces.MEAN_BGR).reshape(1, 3, 1, 1)  # BGR minus mean: biubug6's input
    x = torch.cat([x, torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * 60])
    expected = session.run(None, {graph_input.name: x.numpy()})
    with torch.inference_mode():
        ours = detector.model(x)
    assert [o.name for o in session.get_outputs()] == ["loc", "conf", "landmarks"]
    for name, ref, out in zip(("loc", "conf", "landms"), expected, ours, strict=True):
        assert out.shape == ref.shape, name
        assert np.abs(out.numpy() - ref).max() <= 1e-4, name


def test_state_dict_names() -> None:
    mnet = RetinaFace("mobilenet0.25").state_dict()
    for key in ("body.stage1.0.0.weight", "body.stage1.0.1.running_var", "body.stage3.1.4.bias",
                "fpn.output1.0.weight", "fpn.merge2.1.weight", "ssh1.conv3X3.0.weight",
                "ssh3.conv7x7_3.1.bias", "ClassHead.0.conv1x1.weight",
                "BboxHead.2.conv1x1.bias", "LandmarkHead.1.conv1x1.weight"):  # fmt: skip
        assert key in mnet, key
    assert mnet["LandmarkHead.1.conv1x1.weight"].shape == (20, 64, 1, 1)
    r50 = RetinaFace("resnet50").state_dict()
    assert r50["fpn.output3.0.weight"].shape == (256, 2048, 1, 1)
    assert "body.layer4.2.bn3.running_mean" in r50 and "body.fc.weight" not in r50


def test_fuse_keeps_outputs() -> None:
    gen = torch.Generator().manual_seed(1)
    model = RetinaFace("mobilenet0.25").eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "running_var" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.2)
    x = torch.randn(2, 3, 70, 90, generator=gen) * 50
    with torch.inference_mode():
        before = model(x)
        after = model.fuse()(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_weights_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faces.CACHE_ENV, str(tmp_path))
    FaceDetector()
    (cached,) = (tmp_path / "retinaface").glob("*.safetensors")
    stamp = cached.stat().st_mtime_ns

    def no_conversion(*args: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(faces, "onnx_to_state_dict", no_conversion)
    FaceDetector()
    assert cached.stat().st_mtime_ns == stamp
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temporary left


def test_damaged_cache_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(faces.CACHE_ENV, str(tmp_path))
    sd, cached = faces.bundled_state_dict()
    cached.write_bytes(cached.read_bytes()[:1000])
    again, _ = faces.bundled_state_dict()
    assert again.keys() == sd.keys()
    assert all(torch.equal(sd[k], again[k]) for k in sd)
    fused = faces.load_retinaface(cached, "mobilenet0.25")  # a fused-layout file as weights=
    for key, value in fused.state_dict().items():
        assert torch.equal(value, sd[key]), key


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("name", ["astronaut", "hopper"])
def test_one_face(detector: FaceDetector, name: str, request: pytest.FixtureRequest) -> None:
    image = request.getfixturevalue(name)
    (found,) = detector.detect([image])
    assert len(found) == 1
    face = found[0]
    assert face.score > 0.95
    assert len(face.landmarks) == 5
    assert all(_contains(face, p) for p in face.landmarks[:2])  # both eyes in the box
    left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks
    assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])
    if name == "astronaut":  # upper middle of the photo
        x1, y1, x2, y2 = face.bbox
        assert 150 < (x1 + x2) / 2 < 300 and (y1 + y2) / 2 < 256
        np.testing.assert_allclose(face.bbox, (178, 57, 273, 177), atol=4)


def test_no_face(detector: FaceDetector) -> None:
    from skimage import data

    gray = np.full((240, 320, 3), 128, np.uint8)
    assert detector.detect([data.coffee(), gray]) == [[], []]
    assert detector.predict_jsons(gray) == [{"bbox": [], "score": -1, "landmarks": []}]


def test_two_faces(detector: FaceDetector, astronaut: np.ndarray, hopper: np.ndarray) -> None:
    image = np.concatenate([astronaut, _resize(hopper, 437, 512)], axis=1)  # [512, 949, 3]
    (found,) = detector.detect([image])
    assert len(found) == 2
    assert found[0].score >= found[1].score
    centres = sorted((f.bbox[0] + f.bbox[2]) / 2 for f in found)
    assert centres[0] < 512 < centres[1]


def test_scale_invariance(detector: FaceDetector, hopper: np.ndarray) -> None:
    (full,) = detector.detect([hopper])[0]
    (half,) = detector.detect([_resize(hopper, 256, 300)])[0]
    side = full.bbox[3] - full.bbox[1]  # about 220 px
    np.testing.assert_allclose(np.array(half.bbox) * 2, full.bbox, atol=0.04 * side)
    np.testing.assert_allclose(np.array(half.landmarks) * 2, full.landmarks, atol=0.08 * side)


def test_max_size_maps_back(cache: Path, hopper: np.ndarray) -> None:
    small = FaceDetector(max_size=300)  # detects on a 256 x 300 downscale
    (face,) = small.detect([hopper])[0]
    (reference,) = FaceDetector(max_size=640).detect([_resize(hopper, 256, 300)])[0]
    np.testing.assert_allclose(face.bbox, np.array(reference.bbox) * 2, atol=4)


def test_batched_equals_single(
    detector: FaceDetector, astronaut: np.ndarray, hopper: np.ndarray
) -> None:
    images = [hopper, astronaut, np.full((100, 200, 3), 90, np.uint8)]
    batched = detector.detect(images)
    single = [detector.detect([image])[0] for image in images]
    assert [len(r) for r in batched] == [len(r) for r in single] == [1, 1, 0]
    for b, s in zip(batched, single, strict=True):
        for fb, fs in zip(b, s, strict=True):
            np.testing.assert_allclose(fb.bbox, fs.bbox, atol=0.5)
            np.testing.assert_allclose(fb.landmarks, fs.landmarks, atol=0.5)
            assert abs(fb.score - fs.score) < 1e-3
    stacked = detector.detect(np.stack([astronaut, astronaut[:, ::-1]]))  # array batch
    assert [len(r) for r in stacked] == [1, 1]
    np.testing.assert_allclose(stacked[0][0].bbox, single[1][0].bbox, atol=1e-3)


def test_predict_jsons(detector: FaceDetector, astronaut: np.ndarray) -> None:
    (result,) = detector.predict_jsons(astronaut)
    assert set(result) == {"bbox", "score", "landmarks"}
    assert len(result["bbox"]) == 4 and all(isinstance(v, float) for v in result["bbox"])
    assert isinstance(result["score"], float) and result["score"] > 0.9
    assert np.asarray(result["landmarks"]).shape == (5, 2)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((64, 64, 3), np.float32), "uint8"),
        (np.zeros((64, 64), np.uint8), r"\[H, W, 3\]"),
        (np.zeros((64, 64, 4), np.uint8), r"\[H, W, 3\]"),
        (np.zeros((0, 64, 3), np.uint8), "empty"),
        ("image.jpg", "numpy array"),
    ],
)
def test_bad_inputs(detector: FaceDetector, bad: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        detector.detect([bad])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=match):
        detector.predict_jsons(bad)  # type: ignore[arg-type]


def test_bad_batch_arrays(detector: FaceDetector) -> None:
    with pytest.raises(ValueError, match="wrap one image in a list"):
        detector.detect(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        detector.detect(np.zeros((2, 64, 64, 3), np.float64))


# --------------------------------------------------------------------------- user weights


def _random_state_dict(backbone: faces.Backbone, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, value in RetinaFace(backbone).state_dict().items():
        if "running_var" in key:
            sd[key] = torch.rand(value.shape, generator=gen) + 0.5
        elif value.is_floating_point():
            sd[key] = torch.randn(value.shape, generator=gen) * 0.05
        else:
            sd[key] = value.clone()
    return sd


def _reference_outputs(
    backbone: faces.Backbone, sd: dict[str, torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    model = RetinaFace(backbone).eval()
    model.load_state_dict(sd, strict=True)
    with torch.inference_mode():
        return model(x)


def test_resnet50_weights(cache: Path, tmp_path: Path) -> None:
    sd = _random_state_dict("resnet50")
    path = tmp_path / "Resnet50_Final.pth"
    torch.save({f"module.{k}": v for k, v in sd.items()}, path)
    detector = FaceDetector(path, backbone="resnet50")
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(2)) * 50
    with torch.inference_mode():
        ours = detector.model(x)
    for a, b in zip(ours, _reference_outputs("resnet50", sd, x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    (found,) = detector.detect([np.full((80, 120, 3), 100, np.uint8)])  # runs end to end
    assert all(f.score > detector.confidence for f in found)

    wrapped = tmp_path / "retinaface_resnet50_2020-07-20.pth"  # retinaface-pytorch's release
    torch.save({"state_dict": sd}, wrapped)
    FaceDetector(wrapped, backbone="resnet50", normalization="imagenet")


def test_wrong_weights_raise_media_error(cache: Path, tmp_path: Path) -> None:
    mnet = _random_state_dict("mobilenet0.25")
    wrong = tmp_path / "mobilenet.pth"
    torch.save(mnet, wrong)
    with pytest.raises(DetectorWeightsError, match="not resnet50 RetinaFace weights"):
        faces.load_retinaface(wrong, "resnet50")

    reshaped = dict(mnet)
    reshaped["fpn.output1.0.weight"] = torch.zeros(64, 32, 1, 1)
    torch.save(reshaped, tmp_path / "shape.pth")
    with pytest.raises(DetectorWeightsError, match=r"fpn.output1.0.weight: file \[64, 32, 1, 1\]"):
        faces.load_retinaface(tmp_path / "shape.pth", "mobilenet0.25")

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(wrong.read_bytes()[:5000])
    with pytest.raises(DetectorWeightsError, match="truncated"):
        faces.load_retinaface(truncated, "mobilenet0.25")
    with pytest.raises(DetectorWeightsError, match="no such"):
        faces.load_retinaface(tmp_path / "missing.pth", "mobilenet0.25")
    with pytest.raises(ValueError, match="no bundled weights"):
        faces.load_retinaface(None, "resnet50")


def test_weights_from_url(cache: Path, tmp_path: Path) -> None:
    sd = _random_state_dict("mobilenet0.25", seed=3)
    served = tmp_path / "served"
    served.mkdir()
    torch.save({f"module.{k}": v for k, v in sd.items()}, served / "mobilenet0.25_Final.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        model = faces.load_retinaface(f"{base}/mobilenet0.25_Final.pth", "mobilenet0.25")
        (downloaded,) = (cache / "downloads").glob("*mobilenet0.25_Final.pth")
        stamp = downloaded.stat().st_mtime_ns
        faces.load_retinaface(f"{base}/mobilenet0.25_Final.pth", "mobilenet0.25")  # cached
        assert downloaded.stat().st_mtime_ns == stamp
        with pytest.raises(DetectorWeightsError, match="download failed"):
            faces.load_retinaface(f"{base}/missing.pth", "mobilenet0.25")
    finally:
        server.shutdown()
        server.server_close()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 50
    with torch.inference_mode():
        ours = model(x)
    for a, b in zip(ours, _reference_outputs("mobilenet0.25", sd, x), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
