"""The system benchmarks' smoke modes: each script runs end to end and reports sane numbers.

The scripts run one after another in one subprocess with their own Ray each (never the
test session's), as a user would run them; sharing the process saves each script's
imports. The tests read the JSON each writes beside its markdown report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "benchmarks" / "system"
#: The scripts run at smoke sizes, in this order.
SMOKE_SCRIPTS = ("traffic", "overhead", "per_client", "concurrency", "memory")
#: Seconds all smoke runs may take here. Together they take about three minutes on 2 idle
#: cores; other work on a shared machine can stretch that several times.
SMOKE_TIMEOUT_S = 1500
#: Runs each script as ``python SCRIPT --smoke --out OUT`` would, in this one process.
SMOKE_RUNNER = """
import json, runpy, sys, traceback
codes = {}
for script, out in json.loads(sys.argv[1]):
    sys.argv = [script, "--smoke", "--out", out]
    try:
        runpy.run_path(script, run_name="__main__")
        codes[script] = 0
    except SystemExit as stop:
        codes[script] = stop.code or 0
    except Exception:
        traceback.print_exc()
        codes[script] = 1
print("SMOKE_CODES " + json.dumps(codes))
"""
#: Llama-3.1-8B target layers of one block: q_proj 4096 x 4096 and v_proj 1024 x 4096.
LLAMA_BLOCK_NUMBERS_PER_RANK = (4096 + 4096) + (1024 + 4096)
FLOAT_BYTES = 4
#: Seconds each step of the GPU check's CPU smoke run may take here.
GPU_CHECK_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> tuple[Path, dict[str, int], str]:
    """The folder of the reports, each script's exit code, and the process's output."""
    out_dir = tmp_path_factory.mktemp("smoke")
    plan = [(str(SCRIPTS / f"{script}.py"), str(out_dir / f"{script}.md")) for script in SMOKE_SCRIPTS]
    # Ray puts a script's own folder on its workers' sys.path; here the scripts share one driver.
    path = os.pathsep.join([str(SCRIPTS), str(REPO / "benchmarks" / "peers"), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", SMOKE_RUNNER, json.dumps(plan)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SMOKE_TIMEOUT_S,
        env=os.environ | {"PYTHONPATH": path},
    )
    output = done.stdout[-6000:] + done.stderr[-6000:]
    codes = next((line for line in done.stdout.splitlines() if line.startswith("SMOKE_CODES ")), None)
    assert codes is not None, output  # the runner itself died
    return out_dir, json.loads(codes.removeprefix("SMOKE_CODES ")), output


def smoke_results(smoke_runs, script: str) -> dict:
    """Check ``script``'s smoke run and its report files; return the JSON's results."""
    out_dir, codes, output = smoke_runs
    assert codes[str(SCRIPTS / f"{script}.py")] == 0, output
    out = out_dir / f"{script}.md"
    text = out.read_text()
    assert text.startswith("Machine: ") and "Load average (1 min):" in text and "|---|" in text
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["benchmark"] == script and report["smoke"] is True
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["torch"] and machine["ray"] and machine["load_after"] is not None
    return report["results"]


def test_traffic_matches_the_formulas(smoke_runs):
    results = smoke_results(smoke_runs, "traffic")
    assert results["all_match"] is True
    methods = {(entry["shape_set"], entry["method"]): entry for entry in results["methods"]}
    assert {method for _, method in methods} == {"fedit", "flora", "flexlora", "hetlora", "hlora", "fedplora"}
    for entry in methods.values():
        assert entry["matches"] and all(entry["round_totals_match"])
        for client in entry["clients"]:
            assert client["down"] == client["down_formula"] and client["up"] == client["up_formula"]
            # Ray ships the pickled objects: the counted bytes are nearly all of them.
            assert client["down"] <= client["down_pickled"] < 1.1 * client["down"] + 10_000
    (llama,) = [shape_set for shape_set in results["shape_sets"] if shape_set["name"].startswith("llama")]
    per_rank = FLOAT_BYTES * LLAMA_BLOCK_NUMBERS_PER_RANK * llama["blocks"]
    full_rank = 16 * per_rank
    fedit = methods[(llama["name"], "fedit")]["clients"]
    assert {client["down"] for client in fedit} == {full_rank}
    # Fed-PLoRA sends every one of the R modules: its trained ones as factors, the rest folded.
    assert {client["down"] for client in methods[(llama["name"], "fedplora")]["clients"]} == {full_rank}
    for client in methods[(llama["name"], "hlora")]["clients"]:
        assert client["down"] == client["up"] == client["rank"] * per_rank
    flora = methods[(llama["name"], "flora")]["clients"]
    first, later = [c for c in flora if c["round"] == 0], [c for c in flora if c["round"] == 2]
    assert all(c["down"] == c["up"] for c in first)  # nothing to fold yet
    assert min(c["down"] for c in later) > max(c["down"] for c in first)  # the stacked global delta


def test_concurrency_runs_the_requested_number_of_clients(smoke_runs):
    results = smoke_results(smoke_runs, "concurrency")
    assert [share["k"] for share in results["fake_gpu"]] == [1, 2, 4]
    for share in results["fake_gpu"]:
        assert share["max_concurrent"] == share["k"], share
        assert share["tasks"] == 2 * share["k"]
    assert results["fake_gpu_as_requested"] is True
    levels = {level["level"]: level for level in results["throughput"]}
    assert set(levels) == {1, 2}
    assert levels[1]["torch_threads"] == 2 * levels[2]["torch_threads"]
    for level in levels.values():
        assert level["client_rounds"] == 4 and level["client_rounds_per_s"] > 0
        assert level["max_builds_per_worker"] == 1  # warm workers: the base was built once per worker
    assert results["speedup"] > 0


def test_memory_counts_the_shared_base_once(smoke_runs):
    results = smoke_results(smoke_runs, "memory")
    base = results["base_bytes"]
    assert base > 50 * 2**20  # MiniLM's weights
    settings = {(s["variant"], s["k"]): s for s in results["settings"]}
    assert set(settings) == {("shared", 1), ("shared", 2), ("naive", 1), ("naive", 2)}
    for (variant, k), setting in settings.items():
        assert setting["peak_total_bytes"] > setting["idle_total_bytes"] > 0
        assert setting["most_busy_workers"] == k, (variant, setting)
    for k in (1, 2):
        shared, naive = settings[("shared", k)], settings[("naive", k)]
        # Each naive worker holds its own copy of the base; shared ones read the object store's.
        assert naive["peak_workers_bytes"] - shared["peak_workers_bytes"] > 0.5 * k * base
    assert set(results["working_set_bytes"]) == {"shared", "naive"}


def test_overhead_compares_the_same_work(smoke_runs):
    results = smoke_results(smoke_runs, "overhead")
    assert results["same_work"] is True and results["train_loss_max_rel_diff"] < 1e-3
    (pair,) = results["pairs"]  # the smoke run is one pair
    assert len(pair["bare"]["rounds"]) == len(pair["fedray"]["rounds"]) == 2
    assert pair["fedray"]["rounds"][0]["wall_s"] is None and pair["fedray"]["rounds"][1]["wall_s"] > 0
    assert all(side["rounds"][1]["client_s_p50"] > 0 for side in pair.values())
    assert pair["fedray"]["max_builds"] == 1
    fedray_s, bare_s = (
        sum(r["wall_s"] or r["round_s"] for r in side["rounds"][1:]) for side in (pair["fedray"], pair["bare"])
    )
    assert results["ratio_per_pair"] == [pytest.approx(fedray_s / bare_s)]
    assert results["ratio_wall"] == pytest.approx(fedray_s / bare_s)
    assert results["ratio_wall"] > 0 and results["target_ratio"] == 1.1


def test_gpu_check_runs_its_smoke_mode_on_the_cpu(tmp_path):
    """The GPU check's two steps end to end on the CPU: the bundle (without the wheels this
    machine does not need) and a tiny run that agrees with itself."""
    script = REPO / "benchmarks" / "gpu" / "check.py"
    bundle, out = tmp_path / "bundle", tmp_path / "out"
    for step in (["prepare", "--bundle", str(bundle), "--no-wheels"],
                 ["run", "--bundle", str(bundle), "--out", str(out), "--smoke", "--device", "cpu"]):  # fmt: skip
        done = subprocess.run(
            [sys.executable, str(script), *step], cwd=REPO, capture_output=True, text=True, timeout=GPU_CHECK_TIMEOUT_S
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sum(path.stat().st_size for path in bundle.rglob("*")) < 60 * 2**20  # fits the GPU machine's carry
    results = json.loads((out / "results.json").read_text())
    assert results["quickstart"]["losses_agree"] and results["quickstart"]["loss_gap_max"] == 0.0
    assert len(results["shared"]["per_process"]) == 2
    assert [row["checkpointing"] for row in results["billion"]] == [False, True]
    assert "| client | loss (device) |" in (out / "results.md").read_text()


def test_per_client_overhead_is_the_round_less_its_clients_own_time(smoke_runs):
    results = smoke_results(smoke_runs, "per_client")
    assert results["slots"] == min(results["clients_per_round"], len(os.sched_getaffinity(0)))
    (measured,) = results["rounds"]  # 3 rounds: the first and the last are left out
    assert measured["round"] == 1 and measured["clients"] == results["clients_per_round"]
    expected = (measured["round_s"] - measured["client_s_sum"] / results["slots"]) / measured["clients"] * 1000
    assert measured["client_s_sum"] > 0 and measured["per_client_ms"] == pytest.approx(expected)
    assert results["per_client_ms"] == measured["per_client_ms"] and results["driver_rss_mib"] > 0
