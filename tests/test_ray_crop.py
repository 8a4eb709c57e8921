"""The crop stage on a real two-node Ray cluster on this machine (``ray start --head`` plus a
second ``ray start --address``, each with its own CPUs, stopped by the test): the same bytes as
the local engine, and nothing lost or duplicated when a worker node or the driver is killed.

Ray advertises this machine's own address rather than 127.0.0.1 (it resolves loopback to a
reachable IP); nothing leaves the machine. Token authentication is on, with a token made here
and passed in the environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from media import write_clip
from tests_helpers import free_port, stop_group

from socialmae.data.crop import CropParams
from socialmae.data.crop_stage import crop_faces
from socialmae.data.manifest import ManifestRow, read_manifest, write_manifest
from socialmae.orchestration import RAY_ADDRESS_ENV
from socialmae.tasks import get_task

# A two-node cluster and two crop runs per test: 40-70 s each (`make test-all` runs them).
pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
CROP = {"workers": 1, "clips_per_shard": 2, "frame_rate": 4.0, "image_size": 112,
        "detector_clips": 2}  # a shard's two clips share the detector's batches  # fmt: skip
CLIPS = 9  # 8 good ones and a broken file: five shards


def _corpus(raw: Path) -> None:
    clips = raw / "demo" / "clips"
    clips.mkdir(parents=True)
    names = []
    for i in range(CLIPS - 1):
        names.append(f"clip{i}.mp4")
        write_clip(clips / names[-1], seconds=1.5 + 0.1 * i)
    (clips / "broken.mp4").write_bytes(b"\x00" * 5000)
    names.append("broken.mp4")
    labels = get_task("demo").labels
    rows = [
        ManifestRow(clip_id=name, path=f"clips/{name}", dataset="demo", speaker=f"s{i % 3}",
                    split=("train", "val", "test")[i % 3], label=labels[i % len(labels)])
        for i, name in enumerate(names)
    ]  # fmt: skip
    write_manifest(rows, raw / "demo")


def _outputs(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _assert_same_outputs(out: Path, expected: dict[str, bytes]) -> None:
    """The files in ``out`` (temporaries included) are ``expected``'s, byte for byte; a failure
    names the files rather than printing megabytes of shards."""
    found = _outputs(out)
    assert sorted(found) == sorted(expected)
    assert [name for name in expected if found[name] != expected[name]] == []


def _wait(check, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)  # a shard can follow the first within a fraction of a second


class Cluster:
    """A Ray head and worker nodes on this machine, each a process group we own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(16)}  # fmt: skip
        self.nodes: list[subprocess.Popen] = []

    def start_node(self, *args: str, cpus: int = 2) -> subprocess.Popen:
        log = self.root / f"node{len(self.nodes)}.log"
        command = [RAY, "start", f"--num-cpus={cpus}", "--disable-usage-stats", "--block", *args]
        node = subprocess.Popen(command, env=self.env, start_new_session=True,
                                stdout=log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
        self.nodes.append(node)
        _wait(lambda: "Ray runtime started" in log.read_text(), 90, f"ray node ({log})", node)
        return node

    def start(self) -> None:
        self.start_node("--head", f"--port={self.port}", "--include-dashboard=false")
        self.start_node(f"--address={self.address}")

    def stop(self) -> None:
        for node in reversed(self.nodes):
            stop_group(node, grace=2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    found = Cluster(tmp_path_factory.mktemp("ray"))
    try:
        found.start()
        yield found
    finally:
        found.stop()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """The raw clips, and what the local engine makes of them."""
    root = tmp_path_factory.mktemp("corpus")
    _corpus(root / "raw")
    crop_faces(read_manifest(root / "raw" / "demo"), root / "local", CropParams(**CROP))
    return root / "raw", _outputs(root / "local")


def _stage(cluster: Cluster, raw: Path, out: Path, via_env: bool = False) -> subprocess.Popen:
    """`socialmae crop-faces` on the cluster, as its own process group; the address comes from
    params.yaml, or ``via_env`` from the variable the Prefect flow sets (params say local)."""
    params = out.parent / "params.yaml"
    ray = {} if via_env else {"engine": "ray", "ray_address": cluster.address}
    params.write_text(yaml.safe_dump({"data": {"datasets": ["demo"]}, "crop": {**CROP, **ray}}))
    env = {**cluster.env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    if via_env:
        env[RAY_ADDRESS_ENV] = cluster.address
    command = ["socialmae", "crop-faces", "--params", str(params), "--raw", str(raw),
               "--out", str(out)]  # fmt: skip
    log = (out.parent / "stage.log").open("a")
    return subprocess.Popen(command, env=env, cwd=out.parent, start_new_session=True,
                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def _finish(stage: subprocess.Popen, out: Path) -> dict:
    assert stage.wait(timeout=400) == 0, (out.parent / "stage.log").read_text()[-3000:]
    return json.loads((out.parent / "crop_metrics.json").read_text())


def test_the_cluster_crops_what_the_local_engine_crops_and_resumes_a_killed_driver(
    cluster, corpus, tmp_path
):
    """Killed after its first shard, the driver's rerun makes only the shards left; the result
    is the local engine's, byte for byte (shards, tables, markers, clips.parquet), and no
    half-written file of the killed driver is left."""
    raw, local = corpus
    out = tmp_path / "faces"
    stage = _stage(cluster, raw, out)
    try:
        _wait(lambda: any(out.glob("shard-*.json")), 300, "first shard", stage)
    finally:
        os.killpg(stage.pid, signal.SIGKILL)
        stage.wait()
    finished = len(list(out.glob("shard-*.json")))
    assert finished < 5, "the driver was killed too late to test anything"
    metrics = _finish(_stage(cluster, raw, out), out)
    assert metrics["engine"] == "ray" and metrics["shards"] == 5
    assert metrics["skipped_unchanged"] == 2 * finished
    assert metrics["processed"] == CLIPS - 2 * finished and metrics["quarantined"] == 1
    _assert_same_outputs(out, local)


def _node_processes(node: subprocess.Popen) -> dict[int, str]:
    """The processes of a node (``ray start`` and its descendants: raylet, agents, workers,
    which Ray puts in process groups of their own) -> process title (``ray::IDLE``,
    ``ray::Map(_decode)``, ...)."""
    found: dict[int, str] = {}
    todo = [node.pid]
    while todo:
        pid = todo.pop()
        try:
            found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
            for thread in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(child) for child in (thread / "children").read_text().split()]
        except OSError:  # gone meanwhile
            continue
    return found


RAY_SERVICES = {"ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent"}  # no stage work


def test_losing_a_worker_node_mid_stage_loses_nothing(cluster, corpus, tmp_path):
    """Runs last: it kills the cluster's worker node (SIGKILL of the node and every process
    of it) while the node runs a task of the stage, so that work in flight is lost."""
    raw, local = corpus
    out = tmp_path / "faces"
    node = cluster.nodes[1]
    stage = _stage(cluster, raw, out, via_env=True)

    def busy() -> bool:
        titles = _node_processes(node).values()
        return any(t.startswith("ray::") and t not in RAY_SERVICES for t in titles)

    _wait(busy, 300, "a task of the stage on the worker node", stage)
    processes = _node_processes(node)
    os.killpg(node.pid, signal.SIGKILL)
    for pid in processes:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert len(list(out.glob("shard-*.json"))) < 5, "the node was killed too late"
    metrics = _finish(stage, out)
    assert metrics["engine"] == "ray"  # from the environment, as the flow passes it
    assert metrics["processed"] == CLIPS and metrics["ok"] == CLIPS - 1
    _assert_same_outputs(out, local)
