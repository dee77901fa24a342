"""Several ``fsad benchmark`` workers on one folder: two worker processes split a tiny grid, never run a
run twice and write tables byte-identical to a single process; ``--report_only`` writes the same bytes;
a crashed worker's run is taken over."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fsad_lightning.commands.benchmark import benchmark_main
from fsad_lightning.methods.patchknn import PatchKNNModule

REPO = Path(__file__).resolve().parents[2]
GATE = "FSAD_TEST_GATE"
CATEGORIES = ("alpha", "beta")


class GatedPatchKNN(PatchKNNModule):
    """PatchKNN that starts testing only once the file named by ``$FSAD_TEST_GATE`` exists, so a test can
    hold two workers inside their first runs at the same time."""

    def on_test_start(self) -> None:
        gate = os.environ.get(GATE)
        deadline = time.monotonic() + 120
        while gate and not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {gate} never opened")
            time.sleep(0.05)
        super().on_test_start()


@pytest.fixture(scope="module")
def grid(tmp_path_factory, tiny_benchmark):
    folder = tmp_path_factory.mktemp("workers")
    model = f"{GatedPatchKNN.__module__}.GatedPatchKNN"
    _, config = tiny_benchmark(folder, CATEGORIES, size=32, n_train=2, model_class=model, backbone="resnet18")
    return folder, config


def _args(config: Path, output: Path, *extra: str) -> list[str]:
    return ["--config", str(config), "--shots", "1", "--seeds", "0", "1", "--output", str(output), *extra]


def _tables(output: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(output.glob("data.*"))}


def _ran(stdout: str) -> set[str]:
    return set(re.findall(r"^(\[\d/4\] \S+ k=1 seed=\d): running$", stdout, flags=re.M))


@pytest.mark.slow
def test_two_workers_split_the_runs_and_write_the_single_process_tables(grid, monkeypatch):
    folder, config = grid
    output = folder / "out"
    gate = folder / "gate"
    gate.write_text("open")
    monkeypatch.setenv(GATE, str(gate))
    benchmark_main(_args(config, output))  # one process (this one, one torch thread)
    single = _tables(output)
    assert set(single) == {"data.md", "data.csv", "data.json"}
    shutil.rmtree(output)  # the same output path: the tables name it (manifest paths)

    gate.unlink()
    env = {**os.environ, GATE: str(gate), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "fsad_lightning.commands", "benchmark", *_args(config, output)]
    workers = [
        subprocess.Popen(
            [*command, "--worker_id", name, "--poll_interval", "0.1"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("w1", "w2")
    ]
    try:
        deadline = time.monotonic() + 180
        while len(list((output / "runs").rglob("*.lock"))) < 2:  # both hold a run at the same time
            assert time.monotonic() < deadline and all(w.poll() is None for w in workers), (
                "workers did not start"
            )
            time.sleep(0.05)
        gate.write_text("open")
        logs = [w.communicate(timeout=240)[0] for w in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert [w.returncode for w in workers] == [0, 0], logs
    ran = [_ran(log) for log in logs]
    assert all(ran) and not ran[0] & ran[1], logs  # each ran some, no run ran twice
    assert len(ran[0] | ran[1]) == 4
    assert not list((output / "runs").rglob("*.lock"))  # released
    assert _tables(output) == single  # both workers wrote the tables: the single process's bytes

    for path in output.glob("data.*"):
        path.unlink()
    report = benchmark_main(_args(config, output, "--report_only"))
    assert {o.status for o in report.outcomes} == {"skipped"}
    assert _tables(output) == single


def _foreign_lock(path: Path, host: str, pid: int, age_s: float = 0.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"worker": "crashed", "host": host, "pid": pid, "pid_start": None, "token": "x"})
    )
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))


def test_a_crashed_workers_runs_are_taken_over(grid, monkeypatch, capsys):
    folder, config = grid
    output = folder / "crashed"
    monkeypatch.delenv(GATE, raising=False)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    runs = output / "runs"
    # alpha seed 0: a worker on another host that stops sending heartbeats (stale after --lock_timeout)
    _foreign_lock(runs / "alpha" / "k1" / "s0.lock", "node-elsewhere", 1)
    # beta seed 1: its worker's process on this host is gone, leaving a half-written run folder
    _foreign_lock(runs / "beta" / "k1" / "s1.lock", socket.gethostname(), int(dead.stdout))
    (runs / "beta" / "k1" / "s1").mkdir(parents=True)
    (runs / "beta" / "k1" / "s1" / "partial.txt").write_text("half")
    report = benchmark_main(_args(config, output, "--lock_timeout", "1.5", "--poll_interval", "0.1"))
    printed = capsys.readouterr().out
    assert [o.status for o in report.outcomes] == ["done"] * 4
    assert "[1/4] alpha k=1 seed=0: held by worker crashed (pid 1 on node-elsewhere), left to it" in printed
    assert "[4/4] beta k=1 seed=1: taking over, its owner, worker crashed (pid" in printed
    assert (
        "[1/4] alpha k=1 seed=0: taking over, worker crashed on node-elsewhere sent no heartbeat" in printed
    )
    assert printed.index("[4/4] beta k=1 seed=1: done") < printed.index("[1/4] alpha k=1 seed=0: running")
    assert not (runs / "beta" / "k1" / "s1" / "partial.txt").exists()
    assert not list(runs.rglob("*.lock")) and (output / "data.md").is_file()
