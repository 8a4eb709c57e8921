"""The data stages through their entry points: end to end on a small generated demo set, and
``stage_download`` dispatching each ``data.datasets`` entry to its source (CREMA-D from a local
HTTP server, NDC-ME / VoxCeleb2 / First Impressions from real small clips on disk)."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import pickle
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml
from media import write_clip
from test_download import serve_files

from socialmae.data.manifest import read_manifest
from socialmae.data.stages import stage_crop_faces, stage_download, stage_validate
from socialmae.params import ParamsError
from socialmae.tasks import TRAITS


def test_download_crop_validate(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "data: {datasets: [demo]}\n"
        "download: {demo: {identities: 4, sentences: 1, seconds: 2.0}}\n"
        "crop: {workers: 1, clips_per_shard: 16}\n"
    )
    raw, faces, checks = tmp_path / "raw", tmp_path / "faces", tmp_path / "validation"
    assert stage_download(params, raw)["demo"]["clips"] == 24
    crop = stage_crop_faces(params, raw, faces)
    assert crop["clips"] == 24 and crop["shards"] == 2
    metrics = stage_validate(params, raw, faces, checks)
    assert metrics["success"]["passed"]
    table = pd.read_parquet(faces / "clips.parquet")
    assert (table["status"] == "ok").all() and (table["detection_rate"] > 0.9).all()
    assert json.loads((tmp_path / "crop_metrics.json").read_text())["ok"] == 24
    assert not (faces / "crop_metrics.json").exists()  # timings stay out of the tracked shards
    assert (checks / "data_docs").is_dir()


def _params(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    "data, key, reason",
    [
        ({"data": {"datasets": ["demo", "cremadd"]}}, "data.datasets[1]", "unknown dataset"),
        ({"data": {"datasets": ["demo", "demo"]}}, "data.datasets[1]", "listed twice"),
        ({"data": {"datasets": []}}, "data.datasets", "at least one"),
        ({"data": {"datasets": "demo"}}, "data.datasets", "expected a list"),
        ({"download": {"cremadd": {}}}, "download.cremadd", "unknown dataset"),
        ({"download": {"ndcme": {"rooot": "x"}}}, "download.ndcme.rooot", "unknown key"),
        ({"download": {"cremad": {"workers": "many"}}}, "download.cremad.workers", "integer"),
        ({"download": {"cremad": {"fractions": [0.5, 0.6, 0.1]}}},
         "download.cremad.fractions", "sum to 1"),
        ({"download": {"cremad": {"modalities": ["video", "smell"]}}},
         "download.cremad.modalities[1]", "expected one of"),
        ({"download": {"voxceleb2": {"auth": {"token_env": "s3cr3t value!"}}}},
         "download.voxceleb2.auth.token_env", "NAME of an environment variable"),
        ({"download": {"demo": {"sentences": 0}}}, "download.demo.sentences", "expected > 0"),
        ({"download": {"firstimpressions": {"split": "random"}}},
         "download.firstimpressions.split", "expected one of"),
        ({"download": {"ndcme": {"speaker_pattern": "(P"}}},
         "download.ndcme.speaker_pattern", "not a regular expression"),
        ({"data": {"datasets": ["ndcme"]}}, "download.ndcme.root", "required .*or urls"),
        ({"data": {"datasets": ["voxceleb2"]}, "download": {"voxceleb2": {"subsets": ["dev"]}}},
         "download.voxceleb2.root", "required"),
    ],
)  # fmt: skip
def test_bad_download_params_name_the_key(tmp_path: Path, data: dict, key: str, reason: str):
    raw = tmp_path / "raw"
    with pytest.raises(ParamsError, match=reason) as info:
        stage_download(_params(tmp_path / "params.yaml", data), raw)
    assert info.value.key == key
    assert not raw.exists()  # refused before anything is written


def test_default_params_select_only_the_demo_and_parse_every_section():
    from socialmae.data.sources.catalog import SOURCES, parse_download
    from socialmae.params import load_yaml

    params = load_yaml(Path(__file__).parents[1] / "params.yaml")
    assert params["data"]["datasets"] == ["demo"]
    assert set(params["download"]) == set(SOURCES)
    parsed = parse_download(params["download"], ("demo",))
    assert list(parsed) == ["demo"]
    for name, section in params["download"].items():  # every section is spelled out in full
        assert set(section) == {f.name for f in dataclasses.fields(SOURCES[name].params)}, name


NAMES = ["1001_DFA_ANG_XX", "1002_IEO_HAP_HI", "1003_TIE_SAD_LO", "1004_ITS_NEU_XX"]


def test_stage_download_cremad_from_a_local_server(tmp_path, monkeypatch):
    clip = write_clip(tmp_path / "c.flv", seconds=0.4, fps=10, size=(64, 64)).read_bytes()
    names = tmp_path / "names.txt"
    names.write_text("\n".join([*NAMES, "1005_DFA_FEA_XX"]) + "\n")  # the last is not served
    monkeypatch.setenv("MY_CREMAD_TOKEN", "tok-cremad-secret")
    monkeypatch.delenv("SOCIALMAE_HTTP_TOKEN", raising=False)
    with serve_files() as server:
        for name in NAMES:
            server.files[f"/mirror/VideoFlash/{name}.flv"] = clip
        params = _params(
            tmp_path / "params.yaml",
            {
                "data": {"datasets": ["cremad"]},
                "download": {
                    "cremad": {
                        "source": server.url("/mirror"),
                        "names": str(names),
                        "modalities": ["video"],
                        "workers": 2,
                        "retries": 0,
                        "auth": {"token_env": "MY_CREMAD_TOKEN"},
                    }
                },
            },
        )
        raw = tmp_path / "raw"
        metrics = stage_download(params, raw)
        assert {auth for _, _, auth in server.requests} == {"Bearer tok-cremad-secret"}
        served = len(server.requests)
        assert stage_download(params, raw) == metrics
        # a rerun asks again only for what it lacks (files on disk are kept: persist in dvc.yaml)
        assert [r[0] for r in server.requests[served:]] == [
            "/mirror/VideoFlash/1005_DFA_FEA_XX.flv"
        ]
    assert metrics == {"cremad": {"clips": 4, "speakers": 4, "missing": 1}}
    assert json.loads((raw / "cremad" / "download_metrics.json").read_text()) == metrics["cremad"]
    manifest = read_manifest(raw / "cremad")
    assert sorted(manifest["clip_id"]) == NAMES
    assert set(manifest["label"]) == {"anger", "happiness", "sadness", "neutral"}
    assert all((raw / "cremad" / p).read_bytes() == clip for p in manifest["path"])
    assert "tok-cremad-secret" not in params.read_text()


def _ndcme_tree(root: Path) -> None:
    """Four real clips of four participants, a labels CSV naming them."""
    rows = [("P01_a.mp4", "smile"), ("P02_b.mp4", "laugh"), ("P03_c.mp4", "neutral"),
            ("sub/P04_d.mp4", "smile")]  # fmt: skip
    for name, _ in rows:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        write_clip(root / name, seconds=1.0, fps=8, size=(160, 160))
    (root / "labels.csv").write_text("file,label\n" + "".join(f"{n},{lab}\n" for n, lab in rows))


def _vox_tree(root: Path, clip: bytes) -> None:
    for speaker in ("id00012", "id00015", "id00017"):
        path = root / "dev" / "mp4" / speaker / "21Uxsk56VDQ" / "00001.mp4"
        path.parent.mkdir(parents=True)
        path.write_bytes(clip)


def test_stage_download_local_directories_feed_crop_faces(tmp_path):
    ndcme, vox = tmp_path / "ndc", tmp_path / "vox"
    _ndcme_tree(ndcme)
    _vox_tree(vox, (ndcme / "P01_a.mp4").read_bytes())
    params = _params(
        tmp_path / "params.yaml",
        {
            "data": {"datasets": ["ndcme", "voxceleb2"]},
            "download": {
                "ndcme": {"root": str(ndcme), "mode": "copy"},
                "voxceleb2": {"root": str(vox), "subsets": ["dev"]},  # symlinks by default
                "cremad": {"source": "https://example.invalid/never-fetched"},  # not selected
            },
            "crop": {"workers": 1, "clips_per_shard": 8},
        },
    )
    raw, faces = tmp_path / "raw", tmp_path / "faces"
    metrics = stage_download(params, raw)
    assert metrics == {
        "ndcme": {"clips": 4, "speakers": 4, "missing": 0},
        "voxceleb2": {"clips": 3, "speakers": 3, "missing": 0},
    }
    assert sorted(p.name for p in raw.iterdir()) == ["ndcme", "voxceleb2"]
    ndc = read_manifest(raw / "ndcme").set_index("clip_id")
    assert ndc.loc["P02_b", "label"] == "laughter" and ndc.loc["sub/P04_d", "speaker"] == "P04"
    assert not (raw / "ndcme" / "P01_a.mp4").is_symlink()  # mode: copy
    vox_rows = read_manifest(raw / "voxceleb2")
    assert all((raw / "voxceleb2" / p).is_symlink() for p in vox_rows["path"])

    crop = stage_crop_faces(params, raw, faces)
    assert crop["clips"] == 7
    table = pd.read_parquet(faces / "clips.parquet")
    assert set(table["dataset"]) == {"ndcme", "voxceleb2"}
    assert (table["status"] == "ok").all() and (table["detection_rate"] > 0.9).all()


def test_stage_download_firstimpressions_from_archives_with_named_credentials(
    tmp_path, monkeypatch
):
    clip = write_clip(tmp_path / "c.mp4", seconds=0.4, fps=10, size=(64, 64)).read_bytes()
    videos = {"-AmMDnVl4s8.003.mp4": 0.1, "B1xkD4f2k9A.000.mp4": 0.4, "C9q_x8LmP0w.005.mp4": 0.6}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for video in videos:
            zf.writestr(f"train/{video}", clip)
        scores = {t: {v: base + 0.01 * k for v, base in videos.items()}
                  for k, t in enumerate(TRAITS)}  # fmt: skip
        zf.writestr("annotation_training.pkl", pickle.dumps(scores, protocol=2))
    monkeypatch.setenv("FI_USER", "fi-user")
    monkeypatch.setenv("FI_PASS", "fi-pass-secret")
    monkeypatch.delenv("SOCIALMAE_HTTP_TOKEN", raising=False)
    with serve_files() as server:
        server.files["/fi/train.zip"] = buffer.getvalue()
        params = _params(
            tmp_path / "params.yaml",
            {
                "data": {"datasets": ["firstimpressions"]},
                "download": {
                    "firstimpressions": {
                        "urls": [server.url("/fi/train.zip"), server.url("/fi/absent.zip")],
                        "retries": 0,
                        "auth": {"user_env": "FI_USER", "password_env": "FI_PASS"},
                    }
                },
            },
        )
        metrics = stage_download(params, tmp_path / "raw")
        expected = "Basic " + base64.b64encode(b"fi-user:fi-pass-secret").decode()
        assert {auth for _, _, auth in server.requests} == {expected}
    # one speaker-independent split per YouTube id (only the training pickle exists)
    assert metrics == {"firstimpressions": {"clips": 3, "speakers": 3, "missing": 1}}
    out = tmp_path / "raw" / "firstimpressions"
    manifest = read_manifest(out).set_index("clip_id")
    assert (out / "media" / "train" / "B1xkD4f2k9A.000.mp4").read_bytes() == clip
    assert manifest.loc["B1xkD4f2k9A.000", "path"] == "media/train/B1xkD4f2k9A.000.mp4"
    assert manifest.loc["B1xkD4f2k9A.000", "targets"][0] == pytest.approx(0.4)
    assert set(manifest["split"]) == {"train", "val", "test"}


def test_a_dataset_with_no_clips_stops_the_stage(tmp_path):
    from socialmae.data.errors import MediaError

    names = tmp_path / "names.txt"
    names.write_text("1001_DFA_ANG_XX\n")
    with serve_files() as server:  # serves nothing: every clip is missing
        params = _params(
            tmp_path / "params.yaml",
            {
                "data": {"datasets": ["cremad"]},
                "download": {"cremad": {"source": server.url("/"), "names": str(names),
                                        "modalities": ["audio"], "retries": 0}},
            },
        )  # fmt: skip
        with pytest.raises(MediaError, match=r"no clips \(1 listed but missing\)"):
            stage_download(params, tmp_path / "raw")
