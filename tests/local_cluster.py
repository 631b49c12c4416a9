"""Local multi-node Ray clusters for tests: `ray start` nodes on this machine.

Nodes are stopped by killing the process groups this module started: `ray stop` would
kill every Ray on the machine, other test sessions' included.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
#: Object store per node: the MiniLM base (~90 MB) plus a few rounds of factors.
NODE_OBJECT_STORE_BYTES = 300_000_000
#: Seconds `ray start` may take for one node on a busy 2-core machine.
NODE_START_TIMEOUT_S = 120
#: Seconds the nodes' processes get to vanish after SIGKILL.
NODE_STOP_TIMEOUT_S = 15


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalCluster:
    """A Ray cluster of `ray start` nodes on this machine."""

    address: str
    temp_dir: Path
    env: dict[str, str]
    metrics_ports: list[int]
    #: The head's dashboard (job submission), on 127.0.0.1.
    dashboard_url: str
    #: Per node (the head first), the process group of its daemons and workers.
    process_groups: list[int] = field(default_factory=list)

    def stop_node(self, index: int) -> None:
        """Kill node ``index`` and everything running on it, as a lost machine would vanish."""
        _kill_process_groups([self.process_groups[index]])

    @property
    def service_discovery_file(self) -> Path:
        """Where the head lists every node's metrics address (written by its dashboard)."""
        return self.temp_dir / "prom_metrics_service_discovery.json"


@contextmanager
def local_cluster(
    node_cpus: Sequence[int], *, dashboard: bool = False, env: Mapping[str, str] | None = None
) -> Iterator[LocalCluster]:
    """A head plus one worker node per further entry of ``node_cpus``, each with its own metrics port."""
    cluster_env = os.environ | {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        **(env or {}),
    }
    gcs_port = free_port()
    temp_dir = Path("/tmp") / f"ray-{gcs_port}"  # short: Ray's socket paths have a length limit
    dashboard_port = free_port()
    cluster = LocalCluster(f"127.0.0.1:{gcs_port}", temp_dir, cluster_env, [], f"http://127.0.0.1:{dashboard_port}")
    process_groups = cluster.process_groups
    try:
        for index, cpus in enumerate(node_cpus):
            metrics_port = free_port()
            command = [
                str(BIN / "ray"), "start", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
                f"--object-store-memory={NODE_OBJECT_STORE_BYTES}", f"--metrics-export-port={metrics_port}",
                f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats",
            ]  # fmt: skip
            if index == 0:
                command += [
                    "--head", f"--port={gcs_port}", f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}",
                    f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard_port}",
                ]  # fmt: skip
            else:
                command.append(f"--address={cluster.address}")
            # A session of its own: the node's daemons inherit its process group, which teardown kills.
            node = subprocess.Popen(
                command,
                env=cluster_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            process_groups.append(node.pid)
            output, _ = node.communicate(timeout=NODE_START_TIMEOUT_S)
            assert node.returncode == 0, f"ray start failed:\n{output[-3000:]}"
            cluster.metrics_ports.append(metrics_port)
        yield cluster
    finally:
        _kill_process_groups(process_groups)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _kill_process_groups(groups: list[int]) -> None:
    for group in groups:
        with suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    deadline = time.monotonic() + NODE_STOP_TIMEOUT_S
    for group in groups:
        while time.monotonic() < deadline:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
