import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import Result
from media import write_clip
from PIL import Image
from tests_helpers import free_port
from typer.testing import CliRunner

from socialmae import registry
from socialmae.checkpoints import load_checkpoint
from socialmae.cli import app
from socialmae.data.inputs import load_clip
from socialmae.figures import save_reconstruction_figure
from socialmae.inference import Predictor
from socialmae.model import SocialMAE, get_preset
from socialmae.tasks import EMOTIONS, TRAITS

SMALL = dict(d=64, depth=2, dd=32, decoder_depth=1)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "socialmae.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_info_and_convert(tmp_path, official_file):
    path, _ = official_file(family="social-mae", kind="finetune", label_dim=3, **SMALL)
    converted = tmp_path / "converted"
    done = _cli("convert", str(path), str(converted), "--labels", "neutral,smile,laugh")
    assert done.returncode == 0, done.stderr
    info = _cli("info", str(converted))
    assert info.returncode == 0, info.stderr
    described = json.loads(info.stdout)
    assert described["architecture"] == "SocialMAEClassifier"
    assert described["labels"] == ["neutral", "smile", "laugh"]
    assert described["config"]["channel_order"] == "BGR"


def test_cli_errors_are_clear_and_non_zero(tmp_path, official_file):
    missing = _cli("info", str(tmp_path / "nothing.pth"))
    assert missing.returncode == 2 and "nothing.pth: no such file" in missing.stderr
    path, _ = official_file(**SMALL)
    bad_task = _cli("convert", str(path), str(tmp_path / "out"), "--task", "ranking")
    assert bad_task.returncode == 2 and "--task must be" in bad_task.stderr
    wrong = _cli("convert", str(path), str(tmp_path / "out"), "--labels", "a,b")
    assert wrong.returncode == 2 and "only applies to fine-tuned" in wrong.stderr
    bad_task = _cli("finetune", "huge")
    assert bad_task.returncode == 2 and "unknown task 'huge'" in bad_task.stderr


# --------------------------------------------------------------------------- using models


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    corrupt = root / "corrupt.mp4"
    corrupt.write_bytes(b"this is not a video" * 50)
    return {"face": write_clip(root / "face.mp4", seconds=2.0), "corrupt": corrupt,
            "missing": root / "missing.mp4"}  # fmt: skip


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("models") / "pretrained"
    SocialMAE(get_preset("tiny")).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def expected(classifier_dir, clips) -> dict[str, float]:
    """The library's probabilities for the face clip: what the CLI must print."""
    (prediction,) = Predictor.load(classifier_dir).predict([clips["face"]])
    return prediction.scores


def _run(*args: object) -> Result:
    """``socialmae ARGS`` in this process (the real typer app), stdout and stderr apart."""
    return CliRunner().invoke(app, [str(a) for a in args])


PROBS = [f"prob_{e}" for e in EMOTIONS]


def test_predict_json_csv_and_table_with_a_corrupt_file(
    classifier_dir, clips, expected, tmp_path, monkeypatch
):
    face, corrupt, missing = clips["face"], clips["corrupt"], clips["missing"]
    done = _run("predict", face, corrupt, "--model", classifier_dir, "--format", "json")
    assert done.exit_code == 1, done.stderr
    rows = json.loads(done.stdout)  # stdout holds nothing but the JSON
    assert [r["path"] for r in rows] == [str(face), str(corrupt)]
    assert rows[0]["error"] is None and rows[0]["label"] == max(expected, key=expected.get)
    assert [rows[0][c] for c in PROBS] == pytest.approx([expected[e] for e in EMOTIONS], abs=1e-6)
    assert rows[1]["label"] is None and "not a readable media file" in rows[1]["error"]
    assert all(rows[1][c] is None for c in PROBS)
    assert "1 of 2 files predicted, 1 failed" in done.stderr

    out = tmp_path / "predictions.csv"  # the format comes from the suffix
    done = _run("predict", face, corrupt, missing, "-m", classifier_dir, "--out", out)
    assert done.exit_code == 1 and done.stdout == ""
    table = pd.read_csv(out)
    assert table.columns.tolist() == ["path", "label", "error", *PROBS]
    assert table["path"].tolist() == [str(face), str(corrupt), str(missing)]
    assert table.loc[0, PROBS].tolist() == pytest.approx([rows[0][c] for c in PROBS])
    assert table["error"].tolist()[1:] == [rows[1]["error"], "no such file"]
    assert table.loc[1:, PROBS].isna().all().all()

    monkeypatch.setenv("COLUMNS", "300")
    ok = _run("predict", face, "-m", classifier_dir)  # the rich table, every clip used
    assert ok.exit_code == 0, ok.stderr
    assert str(face) in ok.stdout and "happiness" in ok.stdout
    assert f"{expected['neutral']:.3f}" in ok.stdout and "1 of 1 files predicted" in ok.stderr
    bad = _run("predict", corrupt, "-m", classifier_dir, "--format", "table")
    assert bad.exit_code == 1 and str(corrupt) in bad.stdout
    assert "not a readable media file" in bad.stdout


def test_predict_official_pth_with_task_labels(official_file, clips):
    path, _ = official_file(family="social-mae", kind="finetune", label_dim=5, **SMALL)
    done = _run("predict", clips["face"], "-m", path, "--task", "firstimpressions", "-f", "csv")
    assert done.exit_code == 0, done.stderr
    table = pd.read_csv(io.StringIO(done.stdout))
    assert table.columns.tolist() == ["path", "label", "error", *(f"score_{t}" for t in TRAITS)]
    assert table["label"].isna().all() and table[[f"score_{t}" for t in TRAITS]].notna().all(
        axis=None
    )
    named = _run("predict", clips["corrupt"], "-m", path, "--labels", "a,b,c,d,e", "-f", "json")
    assert named.exit_code == 1 and "prob_e" in json.loads(named.stdout)[0]


def test_predict_and_serve_registered_champion(
    classifier_dir, clips, expected, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the sqlite store's artifacts land in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fp = registry.test_set_fingerprint(["clip-1", "clip-2"])
    version = registry.log_model(classifier_dir, "demo", "accuracy", 0.5, fp, tracking_uri=uri)
    registry.promote("demo", version.version, "accuracy", 0.5, fp, 0.0, tracking_uri=uri)

    champion = "models:/socialmae-demo@champion"
    done = _run("predict", clips["face"], "-m", champion, "--tracking-uri", uri, "-f", "json")
    assert done.exit_code == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert [row[c] for c in PROBS] == pytest.approx([expected[e] for e in EMOTIONS], abs=1e-6)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # --task alone: the task's champion
    by_task = _run("predict", clips["face"], "--task", "demo", "-f", "json")
    assert by_task.exit_code == 0, by_task.stderr
    assert json.loads(by_task.stdout) == [row]
    (tmp_path / "params.yaml").write_text("tasks: [demo]\n")  # in a project: its first task
    bare = _run("predict", clips["face"], "-f", "json")
    assert bare.exit_code == 0, bare.stderr
    assert json.loads(bare.stdout) == [row] and f"using {champion}" in bare.stderr

    unknown = _run("predict", clips["face"], "-m", "models:/socialmae-nope@champion")
    assert unknown.exit_code == 2
    assert "cannot load models:/socialmae-nope@champion" in unknown.stderr
    no_alias = _run("serve", "-m", "models:/socialmae-demo@gone", "--port", free_port())
    assert no_alias.exit_code == 2 and "cannot serve models:/socialmae-demo@gone" in no_alias.stderr


def test_embed_to_npy_and_parquet(classifier_dir, clips, tmp_path):
    dim = get_preset("tiny").embed_dim
    paths = [clips["face"], clips["corrupt"]]
    done = _run("embed", *paths, "-m", classifier_dir, "--out", tmp_path / "emb.npy")
    assert done.exit_code == 1, done.stderr
    vectors = np.load(tmp_path / "emb.npy")
    assert vectors.shape == (2, dim) and vectors.dtype == np.float32
    assert np.isfinite(vectors[0]).all() and np.isnan(vectors[1]).all()
    sidecar = pd.read_csv(tmp_path / "emb.paths.csv")
    assert sidecar["path"].tolist() == [str(p) for p in paths]
    assert pd.isna(sidecar.loc[0, "error"]) and "not a readable" in sidecar.loc[1, "error"]
    assert "1 of 2 files embedded, 1 failed" in done.stderr

    done = _run("embed", *paths, "-m", classifier_dir, "--out", tmp_path / "emb.parquet",
                "--mode", "multimodal")  # fmt: skip
    assert done.exit_code == 1, done.stderr
    table = pq.read_table(tmp_path / "emb.parquet")
    assert table.column_names == ["path", "error", "vector"]
    rows = table.to_pylist()
    assert [len(r["vector"] or []) for r in rows] == [dim, 0]
    assert [r["path"] for r in rows] == [str(p) for p in paths]
    assert rows[0]["error"] is None and rows[1]["vector"] is None
    assert np.asarray(rows[0]["vector"]) == pytest.approx(vectors[0], abs=1e-6)


def test_reconstruct_writes_the_paper_figure(pretrained_dir, classifier_dir, clips, tmp_path):
    out = tmp_path / "fig2.png"
    args = ("--model", pretrained_dir, "--out", out, "--mask-ratio", "0.5", "--seed", "3")
    done = _run("reconstruct", clips["face"], *args)
    assert done.exit_code == 0, done.stderr
    frames = get_preset("tiny").num_frames  # 3 rows of frames + the spectrogram, at 70 dpi
    image = np.asarray(Image.open(out))
    assert image.shape[:2] == (378, round(1.6 * (frames + 2) * 70)) == (378, 1120)
    model = load_checkpoint(pretrained_dir)  # the same figure, made with the library
    clip = load_clip(clips["face"], model.config)
    ref = tmp_path / "ref.png"
    save_reconstruction_figure(model, clip.audio[None], clip.video[None], ref, 3, 0.5, "face.mp4")
    assert np.array_equal(image, np.asarray(Image.open(ref)))

    corrupt = _run("reconstruct", clips["corrupt"], *args)
    assert corrupt.exit_code == 1 and "not a readable media file" in corrupt.stderr
    finetuned = _run("reconstruct", clips["face"], "-m", classifier_dir, "-o", out)
    assert finetuned.exit_code == 2 and "needs a pretraining checkpoint" in finetuned.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "{face}", "-m", "{model}", "--format", "xml"], "'xml' is not one of"),
        (["predict", "{face}", "-m", "{model}", "--mode", "smell"], "'smell' is not one of"),
        (["predict", "{face}"], "give --model"),
        (["predict", "{face}", "--task", "huge"], "unknown task 'huge'"),
        (["predict", "{face}", "-m", "{tmp}/none.pth"], "none.pth: no such file"),
        (["predict", "{face}", "-m", "{model}", "--labels", "a,b"], "--labels only applies"),
        (["predict", "{face}", "-m", "{model}", "--device", "tpu"], "--device must be"),
        (["predict", "{face}", "-m", "{model}", "-o", "{tmp}/p.txt"], "name a .json or .csv"),
        (["predict", "{face}", "-m", "{model}", "-f", "table", "-o", "{tmp}/p.json"], "--out"),
        (["predict", "{face}", "-m", "{model}", "--batch-size", "0"], "--batch-size"),
        (["predict", "{face}", "-m", "{pretrained}"], "predictions need a fine-tuned one"),
        (["predict", "-m", "{model}"], "Missing argument"),
        (["embed", "{face}", "-m", "{model}", "-o", "{tmp}/e.txt"], "name a .npy or .parquet"),
        (["embed", "{face}", "-o", "{tmp}/e.npy"], "Missing option '--model'"),
        (
            [
                "reconstruct",
                "{face}",
                "-m",
                "{pretrained}",
                "-o",
                "{tmp}/f.png",
                "--mask-ratio",
                "1",
            ],
            "--mask-ratio must be in [0, 1)",
        ),
        (["reconstruct", "{face}", "-m", "{pretrained}", "-o", "{tmp}/f.jpg"], "name a .png"),
        (["reconstruct", "{face}", "-m", "{tmp}/none.pth", "-o", "{tmp}/f.png"], "no such file"),
        (["serve", "-m", "{tmp}/nothing"], "not a directory"),
        (["serve", "-m", "{pretrained}"], "predictions need a fine-tuned one"),
        (["serve", "-m", "{model}", "--port", "0"], "--port"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    args, message, clips, classifier_dir, pretrained_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("COLUMNS", "300")  # usage errors are boxed to the terminal width
    monkeypatch.chdir(tmp_path)  # outside a project: no params.yaml names a task
    values = {"face": clips["face"], "model": classifier_dir, "pretrained": pretrained_dir,
              "tmp": tmp_path}  # fmt: skip
    done = _run(*(a.format(**values) for a in args))
    assert done.exit_code == 2, done.output
    assert message in done.stderr
    assert done.stdout == ""


# --------------------------------------------------------------------------- serve


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.mark.integration
@pytest.mark.slow  # 40-60 s: logs the directory, then `mlflow models serve` imports torch
def test_serve_answers_http_requests_and_stops_on_sigterm(
    classifier_dir, clips, expected, tmp_path
):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    command = [sys.executable, "-m", "socialmae.cli", "serve", "--model", str(classifier_dir),
               "--port", str(port)]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        body = {
            "dataframe_split": {
                "columns": ["path"],
                "data": [[str(clips["face"])], [str(clips["corrupt"])]],
            }
        }
        rows = _post(f"{url}/invocations", body)["predictions"]
        proc.send_signal(signal.SIGTERM)  # to `socialmae serve` only: it passes it on
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert [r["path"] for r in rows] == [str(clips["face"]), str(clips["corrupt"])]
    assert [rows[0][c] for c in PROBS] == pytest.approx([expected[e] for e in EMOTIONS], abs=1e-6)
    assert rows[1]["label"] is None and "not a readable media file" in rows[1]["error"]
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # the server is gone with it
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize(
    ("command", "params", "message"),
    [
        (["pretrain"], {"pretrain": {"preset": "nosuch"}}, "pretrain.preset: unknown preset"),
        (["pretrain"], {"pretrain": {"device": "tpu"}}, "pretrain.device: expected auto"),
        (["pretrain"], {"pretrian": {"epochs": 1}}, "pretrian: unknown section"),
        (["pretrain"], {"crop": {"image_size": 100}}, "crop.image_size: 100 is smaller than"),
        (["crop-faces"], {"crop": {"detector_backbone": "vgg"}}, "crop.detector_backbone"),
        (["finetune", "demo"], {"finetune": {"demo": {"device": "tpu"}}}, "finetune.demo.device"),
        (["finetune", "demo"], {"finetune": {"demo": {"by_mode": {"video": {"lr": 1}}}}},
         "by_mode.video.lr"),
        (["tune", "demo"], {"tune": {"demo": {"space": {"head_lrr": {"low": 0.1, "high": 0.2}}}}},
         "tune.demo.space.head_lrr: not a fine-tuning param"),
        (["finetune", "demo"], {"finetune": {"demo": {"init": "nosuch/model"}}},
         "finetune.demo.init: nosuch/model: no such file"),
        (["register", "demo"], {}, "outputs/finetune/demo/metrics.json: not a finetune@demo"),
        (["register", "demo"], {"register": {"mode": "video"}}, "register.mode: 'video' was not"),
    ],
)  # fmt: skip
def test_stage_user_errors_exit_2_before_any_work(command, params, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data: any work would fail differently
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    table = tmp_path / "outputs/finetune/demo/metrics.json"  # a broken (or audio-only) table
    table.parent.mkdir(parents=True)
    table.write_text('{"modes": ["audio"], "primary_metric": "f1_macro", "audio": {"test": {}}}'
                     if "mode" in params.get("register", {}) else "{broken")  # fmt: skip
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = _run(*command, "--params", tmp_path / "params.yaml")
    assert done.exit_code == 2, done.output
    assert message in done.stderr and "Traceback" not in done.output
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_an_unknown_tuned_value_exits_2_naming_it(tmp_path, monkeypatch):
    """best_params.json from an older search space names a key that no longer exists."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("{}")
    best = tmp_path / "outputs/tune/demo/best_params.json"
    best.parent.mkdir(parents=True)
    best.write_text(json.dumps({"params": {"optim.lrr": 0.1}}))
    done = _run("finetune", "demo", "--params", tmp_path / "params.yaml")
    assert done.exit_code == 2, done.output
    assert "finetune.optim.lrr: no such parameter (a tuned value in" in done.stderr
    assert "Traceback" not in done.output and not (tmp_path / "outputs/finetune").exists()


def test_help_reads_as_text():
    """Docstrings reflow to the terminal; no reStructuredText markup leaks into the help."""
    for command in ("predict", "serve", "embed", "register"):
        done = _run(command, "--help")
        assert done.exit_code == 0 and "``" not in done.stdout, command


def test_the_command_starts_without_torch_and_public_names_load_on_use():
    """`socialmae --help` stays fast: the CLI module, the package and the light data modules
    import no torch, MLflow or Prefect; nor do the download and validate stages (only the crop
    stage needs the face detector); the public names still resolve when used."""
    code = (
        "import sys\n"
        "import socialmae, socialmae.cli, socialmae.layout, socialmae.model\n"
        "heavy = sorted(m for m in ('torch', 'mlflow', 'prefect', 'pandas') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "from socialmae.data.stages import stage_download, stage_validate\n"
        "import socialmae.data.sources.demo, socialmae.data.validate\n"
        "assert 'torch' not in sys.modules, 'the download or validate stage imports torch'\n"
        "from socialmae import SocialMAE, CheckpointError, load_checkpoint\n"
        "from socialmae.data import load_clip\n"
        "from socialmae.model import SocialMAEClassifier, MODES\n"
        "assert 'torch' in sys.modules and SocialMAE.__module__ == 'socialmae.model.social_mae'\n"
        "assert load_clip.__module__ == 'socialmae.data.inputs' and MODES[0] == 'multimodal'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
