"""A real two-node Ray cluster on this machine: client tasks spread over both nodes, and
the loss of one node costs its clients a retry.

Each node offers one CPU and each client task asks for one, so a round of two clients
must use both nodes; the aggregation actor needs no CPU. The nodes come from
tests/local_cluster.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

from local_cluster import REPO, local_cluster

#: Seconds the two-round run may take once the nodes are up.
RUN_TIMEOUT_S = 240
#: A two-round run small enough for CPUs: two clients a round, one CPU each.
TINY_RUN = [
    "rounds=2", "num_clients=2", "clients_per_round=2", "partition=iid", "partition_options={}",
    "dataset_options.max_examples=200", "train.local_steps=1", "train.batch_size=4", "train.max_seq_len=16",
    "eval.every=2", "eval.max_examples=8", "resources.num_cpus=1",
]  # fmt: skip

#: Runs fedray.driver.lifecycle.run on the cluster; prints the summary's worker_builds and the live nodes.
RUN_SCRIPT = """
import json, sys
import ray
from fedray.config import load_spec
from fedray.driver.lifecycle import run

address, run_dir, tracking_uri, *overrides = sys.argv[1:]
summary = run(load_spec("jobs/quickstart.yaml", overrides), run_dir=run_dir, tracking_uri=tracking_uri,
              address=address, progress=False)
nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
print("RESULT " + json.dumps({"worker_builds": summary.worker_builds, "nodes": nodes}))
"""


def test_clients_spread_over_both_nodes_and_a_lost_node_costs_a_retry(tmp_path, tracking_uri):
    """Round 0: the two clients run one on each node, each worker builds the base once.
    Round 1: the second node is killed (daemons and workers) while the clients are stalled
    in an injected 6 s delay; its client is retried on the head node and the round completes."""
    slow_clients = ["faults.delay_prob=1.0", "faults.delay_s=6", "reliability.client_retries=4"]
    with local_cluster([1, 1]) as cluster:
        run_dir = tmp_path / "run"
        command = [sys.executable, "-c", RUN_SCRIPT, cluster.address, str(run_dir), tracking_uri, "name=multinode"]
        driver = subprocess.Popen(
            [*command, *TINY_RUN, *slow_clients, "reliability.min_clients_per_round=2"],
            env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (metrics.exists() and metrics.read_text().strip()):
            assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()[1][-3000:]
            time.sleep(0.2)
        time.sleep(2.0)  # round 1's clients are in their 6 s stall, one on each node
        cluster.stop_node(1)
        stdout, stderr = driver.communicate(timeout=RUN_TIMEOUT_S)
    assert driver.returncode == 0, stdout[-3000:] + stderr[-3000:]
    (line,) = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    workers = result["worker_builds"].values()
    assert len({worker["node_id"] for worker in workers}) == 2, "the client tasks did not use both nodes"
    assert [worker["builds"] for worker in workers] == [1] * len(workers), result["worker_builds"]
    rounds = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["clients_ok"], r["clients_failed"]) for r in rounds] == [(2, 0), (2, 0)]
    assert rounds[0]["client_retries"] == 0 and rounds[1]["client_retries"] >= 1, rounds[1]["retries"]
    (reasons,) = rounds[1]["retries"].values()
    assert all("NodeDiedError" in reason or "died" in reason for reason in reasons), reasons
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
