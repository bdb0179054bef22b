"""The Kubernetes example in deploy/: it parses, its topology is one cas accepts, its CronJobs run
real cas commands, and its probes point at endpoints a real `cas serve` answers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from click.testing import CliRunner

import cas
from cas.cli import cli
from cas.topology import apply_yaml, default_topology

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "cas.yaml"


def documents() -> dict[tuple[str, str], dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(DEPLOY.read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_the_manifests_parse_and_hold_what_an_operator_needs() -> None:
    docs = documents()
    assert {k for k, _ in docs} == {"ConfigMap", "Deployment", "Service", "CronJob"}
    config = docs[("ConfigMap", "cas-topology")]["data"]
    top = apply_yaml(default_topology(config["CAS_REPO"]), config["topology.yaml"], config["CAS_REPO"])
    assert [r.name for r in top.regions()] == ["primary", "secondary", "dr"]
    assert top.failover is not None and top.failover.failure_threshold == 3
    assert [t.name for t in top.tiers] == ["hot", "warm", "cold", "archive"]
    assert top.tiers[-1].storage_class == "GLACIER" and top.tiers[-1].retention is None
    jobs = {name: d["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
            for (kind, name), d in docs.items() if kind == "CronJob"}
    assert sorted(jobs.values()) == [
        ["cas", "gc"], ["cas", "tier", "run"], ["cas", "verify", "--read-data", "--record"]]
    runner = CliRunner()
    for command in [*jobs.values(), ["cas", "config", "apply", "x"], ["cas", "serve"]]:
        args = [a for a in command[1:] if not a.startswith("/") and a != "x"]
        result = runner.invoke(cli, [*args, "--help"])
        assert result.exit_code == 0, (command, result.output)


def test_the_probes_point_at_endpoints_cas_serve_answers(tmp_path: Path) -> None:
    deployment = documents()[("Deployment", "cas")]["spec"]["template"]["spec"]["containers"][0]
    command = deployment["command"]
    port = deployment["ports"][0]["containerPort"]
    probes = {name: deployment[name]["httpGet"] for name in ("livenessProbe", "readinessProbe")}
    assert {p["port"] for p in probes.values()} == {port}
    assert command[command.index("--port") + 1] == str(port)
    repo_dir = tmp_path / "repo"
    with cas.Repository.init(repo_dir) as repo:
        repo.save({"w": torch.ones(4)}, tag="s")
    args = list(command[1:])
    args[args.index("--port") + 1] = "0"  # any free port here
    args[args.index("--host") + 1] = "127.0.0.1"
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "CAS_REPO": str(repo_dir), "CAS_CACHE_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "cas.cli", *args], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        base = None
        deadline = time.monotonic() + 60
        while base is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if line.startswith("serving http://"):
                base = line.split()[1].rsplit("/health", 1)[0]
            elif not line and proc.poll() is not None:
                break
        assert base is not None, "cas serve did not start"
        for probe in probes.values():
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(base + probe["path"], timeout=5) as resp:
                        assert resp.status == 200
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
        if proc.stderr is not None:
            proc.stderr.close()


def test_serve_stops_within_its_bound_while_a_round_does_not_return(tmp_path: Path) -> None:
    """SIGINT must end `cas serve`: a replication round stuck on a store that stopped answering is
    named and abandoned after the stop bound, not waited for."""
    import threading

    from cas.serve import ServeState

    with cas.Repository.init(tmp_path / "repo") as repo:
        repo.save({"w": torch.ones(4)}, tag="s")
        release = threading.Event()
        entered = threading.Event()

        def stuck_round(*_args: object) -> None:
            entered.set()
            release.wait(60)
            raise cas.StorageUnavailableError("the replica stopped answering")

        repo.replicate = stuck_round  # type: ignore[method-assign,assignment]
        state = ServeState(repo, refresh_interval=0.1, replicate_interval=0.1)
        state.start()
        try:
            assert entered.wait(10)
            began = time.monotonic()
            assert state.stop(timeout=1.0) == ["cas-serve-replicate"]
            assert time.monotonic() - began < 3.0
        finally:
            release.set()
        assert state.stop(timeout=5.0) == []  # the round ended: nothing left running


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_ends_on_its_signals_even_when_started_with_sigint_ignored(tmp_path: Path, sig: int) -> None:
    """A shell starts background jobs with SIGINT ignored and the child inherits that; `cas serve`
    installs its own handlers, so SIGINT (and SIGTERM, what an orchestrator sends) still end it
    cleanly: the loops stop and the repository closes."""
    repo_dir = tmp_path / "repo"
    with cas.Repository.init(repo_dir) as repo:
        repo.save({"w": torch.ones(4)}, tag="s")
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "CAS_REPO": str(repo_dir), "CAS_CACHE_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cas.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--replicate"],
        env=env, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509 - the launcher's doing
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if line.startswith("serving http://") or (not line and proc.poll() is not None):
                break
        assert line.startswith("serving http://"), "cas serve did not start"
        began = time.monotonic()
        proc.send_signal(sig)
        assert proc.wait(20) == 0
        assert time.monotonic() - began < 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_a_signal_sent_as_soon_as_serve_announces_itself_ends_it_cleanly(tmp_path: Path) -> None:
    """The handlers are in before the address is announced: SIGTERM sent from the announcement
    itself (the earliest moment a launcher can react) ends the server through its cleanup and
    serve returns, as for a signal during the loop, where it used to hit the default disposition
    and kill the process (exit -15)."""
    repo_dir = tmp_path / "repo"
    cas.Repository.init(repo_dir).close()
    code = (
        "import os, signal, sys, cas\n"
        "from cas.serve import serve\n"
        f"repo = cas.Repository.open({str(repo_dir)!r})\n"
        "serve(repo, '127.0.0.1', 0, replicate_interval=None,\n"
        "      ready=lambda host, port: os.kill(os.getpid(), signal.SIGTERM))\n"
        "repo.close()\n"
        "print('ended cleanly')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "CAS_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ended cleanly"
