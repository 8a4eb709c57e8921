"""Dataset sources on tiny fake trees (real small media made with PyAV) and a local server."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
from media import write_clip
from test_download import FileServer, serve_files

from socialmae.data.download import sha256_of
from socialmae.data.errors import MediaError
from socialmae.data.manifest import read_manifest
from socialmae.data.sources.cremad import parse_name, prepare_cremad, read_names
from socialmae.data.sources.firstimpressions import (
    load_annotations,
    prepare_firstimpressions,
    speaker_of,
)
from socialmae.data.sources.ndcme import prepare_ndcme, speaker_from_name
from socialmae.data.sources.splits import assign_speaker_splits, split_counts
from socialmae.data.sources.voxceleb2 import prepare_voxceleb2
from socialmae.tasks import TRAITS


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Bytes of one tiny real clip per container (copied wherever a test needs files)."""
    folder = tmp_path_factory.mktemp("media")
    out = {}
    for suffix in (".mp4", ".flv"):
        path = write_clip(folder / f"clip{suffix}", seconds=0.4, fps=10, size=(64, 64))
        out[suffix] = path.read_bytes()
    wav = folder / "clip.wav"
    with av.open(str(wav), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=16_000)
        stream.layout = "mono"
        tone = (3000 * np.sin(np.arange(6_400) / 5)).astype(np.int16)[None, :]
        frame = av.AudioFrame.from_ndarray(tone, format="s16", layout="mono")
        frame.sample_rate, frame.pts = 16_000, 0
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    out[".wav"] = wav.read_bytes()
    return out


def _put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _check_manifest(frame: pd.DataFrame, out_dir: Path, dataset: str) -> pd.DataFrame:
    """Common checks: the written manifest matches, ids unique, speakers disjoint, paths ok."""
    stored = read_manifest(out_dir)
    assert sorted(stored["clip_id"]) == sorted(frame["clip_id"])
    assert frame["clip_id"].is_unique
    assert set(frame["dataset"]) == {dataset}
    assert (frame.groupby("speaker")["split"].nunique() == 1).all()
    for relative in stored["path"]:
        assert not os.path.isabs(relative)
        resolved = out_dir / relative
        assert resolved.is_file(), relative
        with av.open(str(resolved)) as container:
            assert container.streams
    return stored


# --------------------------------------------------------------------------- splits


def test_speaker_splits_are_deterministic_disjoint_and_non_empty() -> None:
    speakers = [f"spk{i:02d}" for i in range(20)]
    first = assign_speaker_splits(speakers, seed=3)
    assert first == assign_speaker_splits(list(reversed(speakers)) + speakers[:4], seed=3)
    assert first != assign_speaker_splits(speakers, seed=4)
    assert set(first) == set(speakers)
    assert sorted(first.values()).count("train") == 16
    for n in range(3, 30):
        got = assign_speaker_splits([str(i) for i in range(n)], seed=n)
        assert set(got.values()) == {"train", "val", "test"}, n
        assert sum(split_counts(n).values()) == n
    assert set(assign_speaker_splits(["a", "b"]).values()) == {"train", "test"}
    assert assign_speaker_splits(["a"]) == {"a": "train"}
    assert set(assign_speaker_splits("abcdef", (0.5, 0.0, 0.5)).values()) == {"train", "test"}
    with pytest.raises(ValueError, match="sum to 1"):
        assign_speaker_splits(["a"], (0.5, 0.1, 0.1))


# --------------------------------------------------------------------------- CREMA-D

NAMES = [
    "1001_DFA_ANG_XX",
    "1001_IEO_HAP_HI",
    "1002_DFA_DIS_XX",
    "1002_IEO_FEA_LO",
    "1003_ITS_NEU_XX",
    "1004_TIE_SAD_XX",
    "1005_IEO_SAD_MD",
]


@pytest.fixture
def cremad_server(media: dict[str, bytes]) -> Iterator[FileServer]:
    with serve_files() as server:
        for name in NAMES[:-1]:  # the last clip is listed but not on the server
            server.files[f"/CREMA-D/VideoFlash/{name}.flv"] = media[".flv"]
            server.files[f"/CREMA-D/AudioWAV/{name}.wav"] = media[".wav"]
        yield server


def test_parse_cremad_names() -> None:
    clip = parse_name("1001_DFA_ANG_XX")
    assert (clip.actor, clip.sentence, clip.emotion, clip.level) == ("1001", "DFA", "anger", "XX")
    assert parse_name("1091_IEO_HAP_HI").emotion == "happiness"
    for bad in ("1001_DFA_ANG", "1092_DFA_ANG_XX", "1001_XXX_ANG_XX", "1001_DFA_ANX_XX",
                "1001_DFA_ANG_ZZ", "1001-DFA-ANG-XX", "../1001_DFA_ANG_XX"):  # fmt: skip
        with pytest.raises(MediaError) as info:
            parse_name(bad)
        assert bad in str(info.value)


def test_cremad_downloads_and_writes_manifest(
    cremad_server: FileServer, tmp_path: Path, media: dict[str, bytes]
) -> None:
    cremad_server.cut_after["/CREMA-D/VideoFlash/1002_DFA_DIS_XX.flv"] = 500
    out = tmp_path / "raw" / "cremad"
    frame = prepare_cremad(
        NAMES, out, base_url=cremad_server.url("/CREMA-D"), backoff=0.0, progress=False
    )
    stored = _check_manifest(frame, out, "cremad")
    assert frame.attrs["missing"] == ["1005_IEO_SAD_MD"]
    assert len(frame) == 6
    row = stored.set_index("clip_id").loc["1002_DFA_DIS_XX"]
    assert row["label"] == "disgust" and row["speaker"] == "1002"
    assert row["path"] == "VideoFlash/1002_DFA_DIS_XX.flv"
    assert row["extra"] == {"audio": "AudioWAV/1002_DFA_DIS_XX.wav", "level": "XX",
                            "sentence": "DFA"}  # fmt: skip
    assert (out / row["path"]).read_bytes() == media[".flv"]  # resumed after the cut
    assert (out / row["extra"]["audio"]).read_bytes() == media[".wav"]
    assert ("/CREMA-D/VideoFlash/1002_DFA_DIS_XX.flv", "bytes=500-", None) in (
        cremad_server.requests
    )
    labels = dict(zip(stored["clip_id"], stored["label"], strict=True))
    assert labels["1001_DFA_ANG_XX"] == "anger" and labels["1003_ITS_NEU_XX"] == "neutral"
    assert labels["1004_TIE_SAD_XX"] == "sadness" and labels["1002_IEO_FEA_LO"] == "fear"
    assert set(stored["split"]) == {"train", "val", "test"}  # 4 actors, all splits used

    # A rerun finds the files present and fetches nothing new.
    before = len(cremad_server.requests)
    again = prepare_cremad(NAMES[:-1], out, base_url=cremad_server.url("/CREMA-D"), progress=False)
    assert len(cremad_server.requests) == before
    assert again["split"].tolist() == stored["split"].tolist()


def test_cremad_names_file_limit_and_audio_only(cremad_server: FileServer, tmp_path: Path) -> None:
    csv = tmp_path / "SentenceFilenames.csv"
    csv.write_text(
        '"Stimulus_Number","Filename"\n' + "".join(f'{i},"{n}"\n' for i, n in enumerate(NAMES))
    )
    assert read_names(csv) == NAMES
    out = tmp_path / "cremad"
    frame = prepare_cremad(
        csv,
        out,
        base_url=cremad_server.url("/CREMA-D/"),
        limit=3,
        modalities=("audio",),
        progress=True,
        backoff=0.0,
    )
    _check_manifest(frame, out, "cremad")
    assert sorted(frame["clip_id"]) == sorted(NAMES)[:3]
    assert all(p.startswith("AudioWAV/") for p in frame["path"])
    assert not (out / "VideoFlash").exists()

    # names=None fetches the official list from names_url.
    cremad_server.files["/list.csv"] = csv.read_bytes()
    frame = prepare_cremad(
        None,
        tmp_path / "c2",
        base_url=cremad_server.url("/CREMA-D"),
        names_url=cremad_server.url("/list.csv"),
        modalities=("audio",),
        progress=False,
        backoff=0.0,
    )
    assert len(frame) == 6 and frame.attrs["missing"] == ["1005_IEO_SAD_MD"]


def test_cremad_rejects_bad_names_and_lfs_pointers(
    cremad_server: FileServer, tmp_path: Path
) -> None:
    with pytest.raises(MediaError, match="1001_DFA_ANGRY_XX"):
        prepare_cremad(["1001_DFA_ANGRY_XX"], tmp_path / "x", base_url="http://127.0.0.1:9/")
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n"
    cremad_server.files["/CREMA-D/AudioWAV/1001_DFA_ANG_XX.wav"] = pointer
    frame = prepare_cremad(
        ["1001_DFA_ANG_XX", "1002_DFA_DIS_XX"],
        tmp_path / "y",
        base_url=cremad_server.url("/CREMA-D"),
        modalities=("audio",),
        progress=False,
    )
    assert frame.attrs["missing"] == ["1001_DFA_ANG_XX"]
    assert not (tmp_path / "y" / "AudioWAV" / "1001_DFA_ANG_XX.wav").exists()


def test_cremad_from_a_local_copy(tmp_path: Path, media: dict[str, bytes]) -> None:
    local = tmp_path / "CREMA-D"
    for name in NAMES[:4]:
        _put(local / "VideoFlash" / f"{name}.flv", media[".flv"])
        _put(local / "AudioWAV" / f"{name}.wav", media[".wav"])
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n"
    _put(local / "VideoFlash" / f"{NAMES[4]}.flv", pointer)  # cloned without git lfs
    _put(local / "AudioWAV" / f"{NAMES[4]}.wav", media[".wav"])
    wav = f"AudioWAV/{NAMES[0]}.wav"
    # no SentenceFilenames.csv: the names are those of the files in VideoFlash/
    out = tmp_path / "raw" / "cremad"
    frame = prepare_cremad(
        None, out, base_url=str(local), checksums={wav: sha256_of(local / wav)}, progress=False
    )
    stored = _check_manifest(frame, out, "cremad")
    assert sorted(stored["clip_id"]) == NAMES[:4]
    assert frame.attrs["missing"] == [NAMES[4]]  # the pointer is not media
    assert (local / "VideoFlash" / f"{NAMES[4]}.flv").read_bytes() == pointer  # left alone
    row = stored.set_index("clip_id").loc[NAMES[0]]
    assert (out / row["path"]).is_symlink() and (out / row["extra"]["audio"]).is_symlink()
    assert (out / row["path"]).read_bytes() == media[".flv"]

    # the official list when the copy has one; a bad checksum marks the clip missing
    (local / "SentenceFilenames.csv").write_text("Filename\n" + "\n".join(NAMES[:3]) + "\n")
    frame = prepare_cremad(
        None,
        tmp_path / "copied",
        base_url=str(local),
        mode="copy",
        checksums={wav: "0" * 64},
        progress=False,
    )
    assert sorted(frame["clip_id"]) == NAMES[1:3] and frame.attrs["missing"] == [NAMES[0]]
    assert not any((tmp_path / "copied" / p).is_symlink() for p in frame["path"])
    with pytest.raises(MediaError, match="CREMA-D directory not found"):
        prepare_cremad(None, tmp_path / "x", base_url=str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------- VoxCeleb2


def _vox_tree(root: Path, media: dict[str, bytes]) -> list[str]:
    ids = []
    for subset, speakers in (("dev", ["id00012", "id00015", "id00017", "id00020"]),
                             ("test", ["id09001"])):  # fmt: skip
        for s in speakers:
            for video in ("21Uxsk56VDQ", "Ab3fXc_9kqo"):
                for n in (1, 2):
                    _put(root / subset / "mp4" / s / video / f"{n:05d}.mp4", media[".mp4"])
                    ids.append(f"{s}/{video}/{n:05d}")
    return ids


def test_voxceleb2_local_tree(tmp_path: Path, media: dict[str, bytes]) -> None:
    root = tmp_path / "vox"
    ids = _vox_tree(root, media)
    (root / "dev" / "mp4" / "id00012" / "notes.txt").write_text("not a clip")
    out = tmp_path / "raw" / "voxceleb2"
    frame = prepare_voxceleb2(root, out, progress=False)
    stored = _check_manifest(frame, out, "voxceleb2")
    assert sorted(stored["clip_id"]) == sorted(ids)
    assert set(stored["label"]) == {""} and all(len(t) == 0 for t in stored["targets"])
    assert set(stored["speaker"]) == {"id00012", "id00015", "id00017", "id00020", "id09001"}
    assert set(stored["split"]) == {"train", "val", "test"}
    row = stored.set_index("clip_id").loc["id09001/Ab3fXc_9kqo/00002"]
    assert row["extra"] == {"subset": "test", "video": "Ab3fXc_9kqo"}
    assert (out / row["path"]).is_symlink()

    relative = prepare_voxceleb2(root, tmp_path / "rel", mode="relative", limit=3)
    _check_manifest(relative, tmp_path / "rel", "voxceleb2")
    assert len(relative) == 3 and relative["path"].str.startswith("../").all()

    with pytest.raises(MediaError, match="not found"):
        prepare_voxceleb2(tmp_path / "absent", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MediaError, match="no VoxCeleb2 clips"):
        prepare_voxceleb2(tmp_path / "empty", tmp_path / "o")


def test_voxceleb2_from_url_list_in_parts(
    tmp_path: Path, media: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    ids = _vox_tree(tree, media)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(tree.rglob("*.mp4")):
            zf.write(path, path.relative_to(tree).as_posix())
    blob = buffer.getvalue()
    half = len(blob) // 2
    monkeypatch.setenv("SOCIALMAE_HTTP_USER", "voxuser")
    monkeypatch.setenv("SOCIALMAE_HTTP_PASSWORD", "voxpass")
    with serve_files() as server:
        server.files["/vox2_dev_mp4_partaa"] = blob[:half]
        server.files["/vox2_dev_mp4_partab"] = blob[half:]
        url_list = tmp_path / "urls.txt"
        url_list.write_text(
            f"# VoxCeleb2 parts\n{server.url('/vox2_dev_mp4_partab')}\n"
            f"{server.url('/vox2_dev_mp4_partaa')}\n{server.url('/vox2_test_mp4.zip')}\n"
        )
        out = tmp_path / "raw" / "voxceleb2"
        frame = prepare_voxceleb2(None, out, urls=url_list, progress=False, backoff=0.0)
        assert all(auth and auth.startswith("Basic ") for _, _, auth in server.requests)
        before = server.count("/vox2_dev_mp4_partaa") + server.count("/vox2_dev_mp4_partab")
        prepare_voxceleb2(None, out, urls=url_list, progress=False, backoff=0.0)
        after = server.count("/vox2_dev_mp4_partaa") + server.count("/vox2_dev_mp4_partab")
        assert before == after == 2  # extracted archives are not fetched again
    _check_manifest(frame, out, "voxceleb2")
    assert sorted(frame["clip_id"]) == sorted(ids)
    assert frame.attrs["missing"] == [server.url("/vox2_test_mp4.zip")]
    assert (out / "archives" / "vox2_dev_mp4.zip.extracted").exists()
    assert not any((out / p).is_symlink() for p in frame["path"])  # extracted in place


# --------------------------------------------------------------------------- First Impressions


def _annotation(videos: dict[str, float], extra_key: bool = True) -> dict:
    data = {t: {v: round(min(1.0, base + 0.05 * k), 4) for v, base in videos.items()}
            for k, t in enumerate(reversed(TRAITS))}  # fmt: skip
    if extra_key:
        data["interview"] = dict.fromkeys(videos, 0.5)
    return data


FI_SPLITS = {
    "train": {"-AmMDnVl4s8.003.mp4": 0.1, "-AmMDnVl4s8.004.mp4": 0.2, "zzz9f.Ab.001.mp4": 0.3},
    "val": {"B1xkD4f2k9A.000.mp4": 0.4, "absent_vid.002.mp4": 0.5},
    "test": {"C9q_x8LmP0w.005.mp4": 0.6},
}


def _fi_tree(root: Path, media: dict[str, bytes]) -> None:
    folders = {"train": "train/training80_01", "val": "val", "test": "test"}
    for split, videos in FI_SPLITS.items():
        for video in videos:
            if not video.startswith("absent"):
                _put(root / folders[split] / video, media[".mp4"])
        name = {"train": "training", "val": "validation", "test": "test"}[split]
        with open(root / f"annotation_{name}.pkl", "wb") as f:
            pickle.dump(_annotation(videos), f, protocol=2)
    _put(root / "test" / "unlabelled.000.mp4", media[".mp4"])


def test_firstimpressions_official_split(tmp_path: Path, media: dict[str, bytes]) -> None:
    root = tmp_path / "fi"
    _fi_tree(root, media)
    out = tmp_path / "raw" / "firstimpressions"
    frame = prepare_firstimpressions(root, out)
    stored = _check_manifest(frame, out, "firstimpressions")
    assert frame.attrs["missing"] == ["absent_vid.002.mp4"]
    assert frame.attrs["unannotated"] == ["unlabelled.000.mp4"]
    by_id = stored.set_index("clip_id")
    assert by_id.loc["-AmMDnVl4s8.003", "speaker"] == "-AmMDnVl4s8"
    assert by_id.loc["zzz9f.Ab.001", "speaker"] == "zzz9f.Ab"
    assert by_id.loc["-AmMDnVl4s8.004", "split"] == "train"
    assert by_id.loc["B1xkD4f2k9A.000", "split"] == "val"
    assert by_id.loc["C9q_x8LmP0w.005", "split"] == "test"
    # targets follow TRAITS order (the pickle stores traits in reverse order, +0.05 each)
    expected = [0.2 + 0.05 * (len(TRAITS) - 1 - i) for i in range(len(TRAITS))]
    assert np.allclose(by_id.loc["-AmMDnVl4s8.004", "targets"], expected)
    assert by_id.loc["-AmMDnVl4s8.004", "path"] == "train/training80_01/-AmMDnVl4s8.004.mp4"
    assert speaker_of("-AmMDnVl4s8.003.mp4") == "-AmMDnVl4s8"


def test_firstimpressions_speaker_split_and_errors(tmp_path: Path, media: dict[str, bytes]) -> None:
    root = tmp_path / "fi"
    _fi_tree(root, media)
    notes = tmp_path / "notes"
    notes.mkdir()
    for name in ("annotation_training.pkl", "annotation_validation.pkl"):
        shutil.move(root / name, notes / name)
    (root / "annotation_test.pkl").unlink()
    with pytest.raises(MediaError, match=r"annotation_test\.pkl"):
        prepare_firstimpressions(root, tmp_path / "o", annotations_dir=notes, split="official")
    out = tmp_path / "speaker"
    frame = prepare_firstimpressions(root, out, annotations_dir=notes, seed=1)
    _check_manifest(frame, out, "firstimpressions")
    assert set(frame["split"]) == {"train", "val", "test"}  # 3 speakers, auto -> speaker split
    assert len(frame) == 4

    with pytest.raises(MediaError, match="no annotation pickles"):
        prepare_firstimpressions(root, tmp_path / "o")
    with pytest.raises(MediaError, match="directory not found"):
        prepare_firstimpressions(tmp_path / "nowhere", tmp_path / "o")

    bad = tmp_path / "bad.pkl"
    data = _annotation({"x.000.mp4": 0.1})
    data["openness"]["x.000.mp4"] = 1.5
    bad.write_bytes(pickle.dumps(data))
    with pytest.raises(MediaError, match=r"outside \[0, 1\]"):
        load_annotations(bad)
    del data["openness"]
    bad.write_bytes(pickle.dumps(data))
    with pytest.raises(MediaError, match="no openness scores"):
        load_annotations(bad)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_annotation_pickles_cannot_run_code(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "annotation_training.pkl"
    for protocol in (0, 2, 5):
        evil.write_bytes(pickle.dumps({"openness": {"a.000.mp4": _Boom()}}, protocol=protocol))
        with pytest.raises(MediaError, match=r"refusing to load (posix|os|nt)\.system"):
            load_annotations(evil)
    # numpy numbers are allowed now, but not as a way in: the same pickle with them mixed in
    mixed = _annotation({"a.000.mp4": 0.5})
    mixed["openness"] = {"a.000.mp4": np.float64(0.5), "b.000.mp4": _Boom()}
    evil.write_bytes(pickle.dumps(mixed, protocol=2))
    with pytest.raises(MediaError, match="refusing"):
        load_annotations(evil)
    assert not (tmp_path / "pwned").exists()
    refused = {
        "object array": np.array([0.5, None], dtype=object),
        "string array": np.array(["0.5"]),
        "numpy bool": np.bool_(True),
        "datetime": np.datetime64("2020-01-01"),
        "record array": np.array([(1, 0.5)], dtype="i4,f8"),
        "masked array": np.ma.masked_array([0.5]),
    }
    for what, value in refused.items():
        evil.write_bytes(pickle.dumps({"openness": {"a.000.mp4": value}}, protocol=2))
        with pytest.raises(MediaError, match="refusing") as info:
            load_annotations(evil)
        assert "not a plain annotation pickle" in str(info.value), what
    # other numpy globals and codecs stay closed: numpy.load, _codecs.encode with rot13
    evil.write_bytes(b"\x80\x02cnumpy\nload\nX\x03\x00\x00\x00x.pyR.")
    with pytest.raises(MediaError, match=r"refusing to load numpy\.load"):
        load_annotations(evil)
    evil.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(MediaError, match="rot13"):
        load_annotations(evil)
    # Python 2 style pickles (protocol 2, latin1 byte strings) load as str -> float dicts.
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_annotation({"é.000.mp4": 0.5}), protocol=2))
    assert list(load_annotations(plain)) == ["é.000.mp4"]


def _py2_short(text: str) -> bytes:
    """SHORT_BINSTRING: a Python 2 ``str`` (read back as latin1 text)."""
    data = text.encode("latin1")
    return b"U" + bytes([len(data)]) + data


def _py2_float64(value: float) -> bytes:
    """``numpy.float64(value)`` as Python 2 with numpy 1.x pickled it (protocol 2): the
    ``numpy.core.multiarray.scalar`` reconstructor, ``dtype('f8', 0, 1)`` with its state, and
    the raw little-endian bytes as a Python 2 ``str``."""
    dtype = b"cnumpy\ndtype\n" + _py2_short("f8") + b"K\x00K\x01\x87R"
    state = b"(K\x03" + _py2_short("<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    data = b"U\x08" + struct.pack("<d", value)
    return b"cnumpy.core.multiarray\nscalar\n" + dtype + state + data + b"\x86R"


def _py2_annotation(videos: dict[str, float]) -> bytes:
    """A whole annotation pickle of numpy float64 scores, written opcode by opcode."""
    body = b""
    for trait, scores in _annotation(videos, extra_key=False).items():
        items = b"".join(_py2_short(v) + _py2_float64(x) for v, x in scores.items())
        body += _py2_short(trait) + b"}(" + items + b"u"
    return b"\x80\x02}(" + body + b"u."


def test_annotation_pickles_with_numpy_numbers_load(
    tmp_path: Path, media: dict[str, bytes]
) -> None:
    videos = {"-AmMDnVl4s8.003.mp4": 0.1, "B1xkD4f2k9A.000.mp4": 0.4, "zzz9f.Ab.001.mp4": 0.3}
    expected = {v: [0.05 * (len(TRAITS) - 1 - i) + base for i in range(len(TRAITS))]
                for v, base in videos.items()}  # fmt: skip
    plain = _annotation(videos)
    as_numpy = {
        "float64": lambda x: np.float64(x),
        "float32": lambda x: np.float32(x),
        "1-element array": lambda x: np.array([x]),
        "0-d array": lambda x: np.array(x),
        "big-endian": lambda x: np.array([x], dtype=">f8"),
    }
    path = tmp_path / "annotation_training.pkl"
    for what, convert in as_numpy.items():
        data = {t: {v: convert(x) for v, x in s.items()} for t, s in plain.items()}
        for protocol in (2, pickle.HIGHEST_PROTOCOL):
            path.write_bytes(pickle.dumps(data, protocol=protocol))
            loaded = load_annotations(path)
            assert list(loaded) == sorted(videos), (what, protocol)
            for video, targets in loaded.items():
                assert all(type(t) is float for t in targets)
                assert np.allclose(targets, expected[video], atol=1e-6), (what, protocol)

    # Written the way Python 2 + numpy 1.x did: numpy.core.multiarray, byte strings as str.
    legacy = _py2_annotation(videos)
    assert pickle.loads(legacy, encoding="latin1")["openness"][  # real numpy reads it too
        "B1xkD4f2k9A.000.mp4"
    ] == np.float64(plain["openness"]["B1xkD4f2k9A.000.mp4"])
    path.write_bytes(legacy)
    loaded = load_annotations(path)
    assert list(loaded) == sorted(videos)
    assert all(np.allclose(loaded[v], expected[v]) for v in videos)

    # and the whole source on such pickles
    root = tmp_path / "fi"
    for video in videos:
        _put(root / "train" / video, media[".mp4"])
    shutil.copy(path, root / "annotation_training.pkl")
    frame = prepare_firstimpressions(root, tmp_path / "out")
    _check_manifest(frame, tmp_path / "out", "firstimpressions")
    by_id = frame.set_index("clip_id")
    assert np.allclose(by_id.loc["B1xkD4f2k9A.000", "targets"], expected["B1xkD4f2k9A.000.mp4"])


# --------------------------------------------------------------------------- NDC-ME


def _ndc_tree(root: Path, media: dict[str, bytes], rows: list[tuple[str, str]]) -> None:
    for name, _ in rows:
        if not name.startswith("gone"):
            _put(root / name, media[".mp4"])


NDC_ROWS = [
    ("P01_0001.mp4", "neutral"),
    ("P01_0002.mp4", "Smile"),
    ("P02-0001.mp4", "laugh"),
    ("P02-0002.mp4", "laughter"),
    ("clips/P03_0001.mp4", "smile"),
    ("P04_0001.mp4", "neutral"),
    ("gone/P05_0001.mp4", "smile"),
]


def test_ndcme_labels_and_speakers(tmp_path: Path, media: dict[str, bytes]) -> None:
    root = tmp_path / "ndc"
    _ndc_tree(root, media, NDC_ROWS)
    (root / "labels.csv").write_text(
        "file,label\n" + "".join(f"{n},{lab}\n" for n, lab in NDC_ROWS)
    )
    out = tmp_path / "raw" / "ndcme"
    frame = prepare_ndcme(root, out)
    stored = _check_manifest(frame, out, "ndcme")
    assert frame.attrs["missing"] == ["gone/P05_0001.mp4"]
    by_id = stored.set_index("clip_id")
    assert by_id.loc["P02-0001", "label"] == "laughter"
    assert by_id.loc["P01_0002", "label"] == "smile"
    assert by_id.loc["clips/P03_0001", "speaker"] == "P03"
    assert sorted(set(stored["speaker"])) == ["P01", "P02", "P03", "P04"]
    assert set(stored["split"]) == {"train", "val", "test"}
    assert speaker_from_name("sub/P07_smile_003.mp4") == "P07"


def test_ndcme_participant_column_and_errors(tmp_path: Path, media: dict[str, bytes]) -> None:
    root = tmp_path / "ndc"
    rows = [("a1.mp4", "smile"), ("a2.mp4", "neutral"), ("b1.mp4", "laughter")]
    _ndc_tree(root, media, rows)
    csv = tmp_path / "ndc_labels.csv"
    csv.write_text("File,Label,Participant\na1.mp4,smile,s1\na2.mp4,neutral,s2\nb1.mp4,laugh,s3\n")
    frame = prepare_ndcme(root, tmp_path / "out", labels_csv=csv, mode="copy")
    stored = _check_manifest(frame, tmp_path / "out", "ndcme")
    assert dict(zip(stored["clip_id"], stored["speaker"], strict=True)) == {
        "a1": "s1",
        "a2": "s2",
        "b1": "s3",
    }
    assert not (tmp_path / "out" / "a1.mp4").is_symlink()

    csv.write_text("file,label\na1.mp4,grin\n")
    with pytest.raises(MediaError) as info:
        prepare_ndcme(root, tmp_path / "o", labels_csv=csv)
    assert "grin" in str(info.value) and str(csv) in str(info.value)
    csv.write_text("file,label\nnospeaker.mp4,smile\n")
    with pytest.raises(MediaError, match="cannot tell the speaker"):
        prepare_ndcme(root, tmp_path / "o", labels_csv=csv)
    csv.write_text("file,label\n../escape_1.mp4,smile\n")
    with pytest.raises(MediaError, match="bad file entry"):
        prepare_ndcme(root, tmp_path / "o", labels_csv=csv)
    with pytest.raises(MediaError, match="labels CSV not found"):
        prepare_ndcme(root, tmp_path / "o")
    with pytest.raises(MediaError, match="directory not found"):
        prepare_ndcme(tmp_path / "missing", tmp_path / "o", labels_csv=csv)
