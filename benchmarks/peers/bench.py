"""What both sides of the peer comparison share: the spec they run, their command line, their result.

``flower_fedit.py`` (in ``.venv-peer``) and ``compare.py`` (in ``.venv``) load the spec the
way ``fedray run`` does, measure a run the same way (``pss.PssSampler`` over the run's
whole process tree, wall time per round) and write one JSON record each.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pss import PssPeak

from fedray.config import Spec, SpecError, load_spec

#: The spec both sides run unless one is named.
DEFAULT_SPEC = "jobs/fedit.yaml"
#: Overrides of ``--smoke``: two clients, two short rounds, tiny data; under a minute on 2 cores.
SMOKE_OVERRIDES = (
    "name=peer-smoke",
    "num_clients=2",
    "clients_per_round=2",
    "rounds=2",
    "partition=iid",
    "partition_options={}",
    "dataset_options.max_examples=400",
    "train.local_steps=2",
    "train.batch_size=8",
    "train.max_seq_len=16",
    "eval.every=1",
    "eval.max_examples=32",
    "resources.num_cpus=1",
)
#: Exit code for a spec the peer comparison cannot run (as ``fedray run``'s bad input).
EXIT_BAD_INPUT = 2
BYTES_PER_MIB = 2**20
#: Packages whose versions a result records.
PACKAGES = ("fedray", "flwr", "ray", "torch", "transformers", "peft")


def parse_args(
    description: str, argv: list[str] | None, extra: Callable[[argparse.ArgumentParser], Any] | None = None
) -> argparse.Namespace:
    """The command line both sides take: ``SPEC [key=value ...] [--smoke] [--out PATH]``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("spec", nargs="?", default=DEFAULT_SPEC, help=f"fedray spec YAML (default {DEFAULT_SPEC})")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, as for `fedray run`")
    parser.add_argument("--smoke", action="store_true", help=f"a tiny run (overrides {' '.join(SMOKE_OVERRIDES)})")
    parser.add_argument("--out", type=Path, help="write the result as JSON to this file")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


def peer_spec(path: str, overrides: list[str], *, smoke: bool = False) -> Spec:
    """The spec as ``fedray run`` loads it (smoke overrides first), checked to be one the peer can run."""
    spec = load_spec(path, [*SMOKE_OVERRIDES, *overrides] if smoke else overrides)
    if spec.method != "fedit":
        raise SpecError(f"method={spec.method}: the Flower peer runs FedIT only; use jobs/fedit.yaml or method=fedit")
    if any(getattr(spec.faults, name) > 0 for name in ("raise_prob", "kill_prob", "delay_prob", "corrupt_prob")):
        raise SpecError("the Flower peer injects no faults; set every faults.*_prob to 0")
    if spec.reliability.max_update_norm is not None:
        raise SpecError("the Flower peer checks no update norms; set reliability.max_update_norm=null")
    return spec


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class RunResult:
    """One measured run of one system."""

    system: str
    spec: Spec
    #: Per round: ``round`` (from 0), ``round_s``, ``clients`` (trained), ``train_loss`` and eval metrics.
    rounds: list[dict[str, Any]]
    #: Wall time of the whole run: start-up (Ray, model, data), every round, shut-down of the system's own work.
    total_s: float
    memory: PssPeak
    load_before: float
    load_after: float
    command: str = field(default_factory=lambda: shlex.join([os.path.basename(sys.executable), *sys.argv]))
    versions: dict[str, str] = field(default_factory=package_versions)

    @property
    def round_seconds(self) -> list[float]:
        return [record["round_s"] for record in self.rounds]

    @property
    def final_metrics(self) -> dict[str, float]:
        """The eval metrics of the last round (every run evaluates after its last round)."""
        return {key: value for key, value in self.rounds[-1].items() if key.startswith("eval_")}

    def to_json(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "command": self.command,
            "spec_digest": self.spec.digest(),
            "round_s_median": statistics.median(self.round_seconds),
            "round_s_all": self.round_seconds,
            "rounds_s_sum": sum(self.round_seconds),
            "total_s": self.total_s,
            "peak_pss_bytes": self.memory.bytes,
            "peak_pss_mib": self.memory.bytes / BYTES_PER_MIB,
            "peak_pss_processes": self.memory.processes,
            "peak_pss_at_s": self.memory.at_s,
            "peak_pss_by_process": self.memory.by_label,
            "pss_samples": self.memory.samples,
            "final_metrics": self.final_metrics,
            "final_eval_accuracy": self.final_metrics.get("eval_accuracy"),
            "rounds": self.rounds,
            "machine": {
                "cores": os.cpu_count(),
                "load_avg_1min_before": self.load_before,
                "load_avg_1min_after": self.load_after,
            },
            "versions": self.versions,
            "spec": self.spec.model_dump(),
        }

    def summary_line(self) -> str:
        rounds = " ".join(f"{s:.2f}" for s in self.round_seconds)
        final = " ".join(f"{key}={value:.4f}" for key, value in self.final_metrics.items() if key != "eval_loss")
        return (
            f"{self.system}: {len(self.rounds)} rounds, round_s median {statistics.median(self.round_seconds):.2f} "
            f"(all: {rounds}), total {self.total_s:.1f} s, peak PSS {self.memory.bytes / BYTES_PER_MIB:.0f} MiB "
            f"over {self.memory.processes} processes, {final}"
        )

    def write(self, out: Path | None) -> None:
        """Write the JSON record to ``out`` (if given) and print the one-line summary."""
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        print(self.summary_line(), flush=True)


def load_avg() -> float:
    """The 1-minute load average (other work on the machine skews every wall time)."""
    return os.getloadavg()[0]
