"""fedray's own FedIT on the peer's spec, measured as ``flower_fedit.py`` measures Flower, and the two side by side.

Runs ``fedray.driver.lifecycle.run`` in this process (the main ``.venv``) under the same PSS sampler
over the driver and every Ray process it starts; a round's wall time is fedray's own
``round_s`` from the run's metrics.jsonl. With ``--run-peer`` it first runs the Flower
peer in ``.venv-peer`` (one after the other, never at once); with ``--peer-result`` it
prints both results as one markdown table.

    .venv/bin/python benchmarks/peers/compare.py jobs/fedit.yaml --run-peer \\
        --out runs/peers/fedray.json --peer-result runs/peers/flower.json
    .venv/bin/python benchmarks/peers/compare.py --smoke --run-peer --out /tmp/peers/fedray.json \\
        --peer-result /tmp/peers/flower.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench
from pss import PssSampler

from fedray.config import Spec, SpecError

ROOT = Path(__file__).resolve().parents[2]
#: The peer's interpreter, as ``make peer-env`` installs it.
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"
PEER_SCRIPT = Path(__file__).resolve().parent / "flower_fedit.py"


def run_fedray(spec: Spec, work_dir: Path) -> tuple[list[dict[str, Any]], float]:
    """Run ``spec`` with fedray (run directory and MLflow store under ``work_dir``); its rounds and total seconds."""
    # Imported here, not at the top: they take seconds, and a bad spec should fail at once.
    import ray

    from fedray.driver.lifecycle import run

    started = time.perf_counter()
    summary = run(spec, run_dir=work_dir / "run", tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}", progress=False)
    total_s = time.perf_counter() - started
    ray.shutdown()
    lines = (summary.run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], total_s


def run_peer(args: argparse.Namespace) -> None:
    """The Flower peer on the same spec and overrides, in its own venv, writing ``args.peer_result``."""
    if not PEER_PYTHON.exists():
        raise SystemExit(f"compare: {PEER_PYTHON} is missing; run `make peer-env` first")
    command = [str(PEER_PYTHON), str(PEER_SCRIPT), args.spec, *args.overrides, "--out", str(args.peer_result)]
    subprocess.run([*command, *(["--smoke"] if args.smoke else [])], check=True, cwd=ROOT)


def table(ours: dict[str, Any], peer: dict[str, Any]) -> str:
    """Both results side by side (markdown); they must come from the same spec."""
    if ours["spec_digest"] != peer["spec_digest"]:
        raise SystemExit(
            f"compare: the results ran different specs ({ours['spec_digest']} vs {peer['spec_digest']}); "
            "run both with the same spec and overrides"
        )

    def each_round(key: str, digits: int):
        return lambda result: " ".join(f"{record.get(key, float('nan')):.{digits}f}" for record in result["rounds"])

    def load(result: dict[str, Any]) -> str:
        machine = result["machine"]
        return f"{machine['load_avg_1min_before']:.1f} / {machine['load_avg_1min_after']:.1f}"

    rows = [
        ("round s (median)", lambda r: f"{r['round_s_median']:.2f}"),
        ("round s (each)", each_round("round_s", 2)),
        ("sum of rounds s", lambda r: f"{r['rounds_s_sum']:.1f}"),
        ("total s", lambda r: f"{r['total_s']:.1f}"),
        ("peak PSS MiB", lambda r: f"{r['peak_pss_mib']:.0f} ({r['peak_pss_processes']} processes)"),
        *((f"final {key}", lambda r, key=key: f"{r['final_metrics'][key]:.4f}") for key in ours["final_metrics"]),
        ("train_loss (each round)", each_round("train_loss", 4)),
        ("load avg before / after", load),
        ("versions", lambda r: f"ray {r['versions'].get('ray')}, flwr {r['versions'].get('flwr', '-')}"),
    ]
    lines = [f"| | {ours['system']} | {peer['system']} |", "|---|---|---|"]
    lines += [f"| {name} | {value(ours)} | {value(peer)} |" for name, value in rows]
    same_clients = [a["clients"] == b["clients"] for a, b in zip(ours["rounds"], peer["rounds"], strict=True)]
    lines.append(f"\nSame clients in every round: {'yes' if all(same_clients) else f'NO: {same_clients}'}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--peer-result", type=Path, help="the Flower peer's JSON result, to print side by side")
        parser.add_argument("--run-peer", action="store_true", help="first run the Flower peer into --peer-result")
        parser.add_argument("--work-dir", type=Path, help="keep fedray's run directory here (default: a temp dir)")

    args = bench.parse_args("Run fedray's FedIT on the peer's spec and measure it the same way.", argv, extra)
    if args.run_peer and args.peer_result is None:
        raise SystemExit("compare: --run-peer needs --peer-result PATH to write the peer's result to")
    try:
        spec = bench.peer_spec(args.spec, args.overrides, smoke=args.smoke)
    except SpecError as error:
        print(f"compare: {error}", file=sys.stderr)
        return bench.EXIT_BAD_INPUT
    if args.run_peer:
        run_peer(args)
    load_before = bench.load_avg()
    with tempfile.TemporaryDirectory(prefix="fedray-peer-") as temp:
        work_dir = args.work_dir or Path(temp)
        with PssSampler() as sampler:
            rounds, total_s = run_fedray(spec, work_dir)
    result = bench.RunResult("fedray", spec, rounds, total_s, sampler.peak, load_before, bench.load_avg())
    result.write(args.out)
    if args.peer_result is not None:
        print(table(result.to_json(), json.loads(args.peer_result.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
