"""The Flower peer of the system benchmark (benchmarks/peers/): its smoke run, against fedray's own run.

The peer lives in its own venv (``make peer-env``: flwr[simulation] pins an older ray
than fedray's), which CI does not install; without it these tests are skipped.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path

import pytest

from fedray.config import validate_spec
from fedray.driver.lifecycle import run
from fedray.driver.sampling import sample_clients

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
PEER_SCRIPT = ROOT / "benchmarks" / "peers" / "flower_fedit.py"
#: The smoke run takes well under a minute on 2 idle cores; a busy machine gets slack.
SMOKE_TIMEOUT_S = 600
#: The peer's ClientApp actors, as Ray titles their processes.
ACTOR_LABEL = "ray::ClientAppActor"


def _peer_missing() -> str | None:
    """Why the peer cannot run here, or None."""
    if not PEER_PYTHON.exists():
        return f"{PEER_PYTHON.relative_to(ROOT)} is missing (the Flower peer is not installed; `make peer-env`)"
    probe = subprocess.run([str(PEER_PYTHON), "-c", "import flwr, fedray"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{PEER_PYTHON.relative_to(ROOT)} cannot import flwr and fedray ({probe.stderr.strip()[-200:]})"
    return None


@pytest.fixture(scope="module")
def peer_smoke(tmp_path_factory):
    """The peer's --smoke run: its JSON result and its stdout."""
    reason = _peer_missing()
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("peer") / "flower.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)  # the peer starts its own local Ray, never the test session's
    done = subprocess.run(
        [str(PEER_PYTHON), str(PEER_SCRIPT), "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_smoke_run_writes_its_measurements(peer_smoke):
    result, stdout = peer_smoke
    spec = validate_spec(result["spec"])
    assert result["system"] == "flower" and spec.method == "fedit"
    assert result["spec_digest"] == spec.digest()
    assert stdout.strip().splitlines()[-1].startswith(f"flower: {spec.rounds} rounds, round_s median")
    rounds = result["rounds"]
    assert [record["round"] for record in rounds] == list(range(spec.rounds))
    assert result["round_s_all"] == [record["round_s"] for record in rounds] and all(
        s > 0 for s in result["round_s_all"]
    )
    assert result["round_s_median"] == pytest.approx(statistics.median(result["round_s_all"]))
    assert result["total_s"] > sum(result["round_s_all"])
    # The memory covers the driver and the Ray processes it started, the client actors among them.
    by_process = result["peak_pss_by_process"]
    assert result["peak_pss_processes"] >= 4 and by_process.get(ACTOR_LABEL, 0) > 0
    assert sum(by_process.values()) == result["peak_pss_bytes"]
    assert 0.0 <= result["final_eval_accuracy"] <= 1.0
    assert result["final_metrics"]["eval_accuracy"] == rounds[-1]["eval_accuracy"]
    assert "flwr" in result["versions"] and result["versions"]["ray"] != ""


def test_smoke_run_does_fedrays_work(peer_smoke, ray_session, tracking_uri, tmp_path):
    """fedray's own FedIT on the same spec trains the same clients to the same numbers."""
    result, _ = peer_smoke
    spec = validate_spec(result["spec"])
    summary = run(spec, run_dir=tmp_path / "run", tracking_uri=tracking_uri, progress=False)
    ours = [json.loads(line) for line in (summary.run_dir / "metrics.jsonl").read_text().splitlines()]
    for round_index, (fedray_round, flower_round) in enumerate(zip(ours, result["rounds"], strict=True)):
        assert flower_round["clients"] == fedray_round["clients"] == sample_clients(spec, round_index)
        # Same starts, shards, seeds and steps: equal up to float32 rounding of the averages.
        assert flower_round["train_loss"] == pytest.approx(fedray_round["train_loss"], abs=1e-5)
        assert flower_round["eval_loss"] == pytest.approx(fedray_round["eval_loss"], abs=1e-5)
        assert flower_round["eval_accuracy"] == fedray_round["eval_accuracy"]
