"""Screen BIG-bench tasks for rank sensitivity: one centralised LoRA per rank, no Ray.

A federated top-rank vs bottom-rank gap needs a setting where rank matters at all; the
cheapest test of that is centralised training (one client holding the whole train split)
at each rank, on the same examples, steps and seed. Each cell (rank, seed) trains a FedIT
adapter of that rank through fedray's worker-side code (``Workbench``) and scores the
held-out split of every task: exact match and ROUGE-L of greedy answers. Cells are files
in ``--out`` and a cell already there is not run again, so a screen resumes after a stop.

    .venv/bin/python benchmarks/bigbench/probe.py --out benchmarks/bigbench/probes/NAME \\
        --tasks word_unscrambling linguistic_mappings/past_tense_json --ranks 1 16 --seeds 0 1 2
    .venv/bin/python benchmarks/bigbench/probe.py --out benchmarks/bigbench/probes/NAME --table

Needs the bigbench archive (`make bigbench`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fedray.config import EvalSpec, TrainSpec
from fedray.data import load_dataset
from fedray.methods import create_method
from fedray.models import ModelSpec, export_base, load_base
from fedray.worker.workbench import Workbench

#: What a probe of rank r trains: scale s is shared by every rank, as in fedray runs.
SCALE = 2.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the cells (one JSON file each)")
    parser.add_argument("--tasks", nargs="+", help="BIG-bench task names (the first run of a folder fixes them)")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--targets", nargs="+", help="LoRA target modules (default: the model's, q_proj v_proj)")
    parser.add_argument("--max-per-task", type=int, default=400)
    parser.add_argument("--eval-per-task", type=int, default=100, help="held-out examples scored per task")
    parser.add_argument("--epochs", type=float, default=2.0, help="passes over the train split")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-seq-len", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, help="torch threads (default torch's; 1 beside other work on the cores)")
    parser.add_argument("--table", action="store_true", help="print the table of the cells in --out and stop")
    return parser.parse_args(argv)


def settings_of(args: argparse.Namespace) -> dict:
    """What every cell of a folder shares; a later run must ask for the same."""
    return {
        "tasks": args.tasks,
        "model": args.model,
        "targets": args.targets,
        "max_per_task": args.max_per_task,
        "eval_per_task": args.eval_per_task,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "max_seq_len": args.max_seq_len,
        "max_new_tokens": args.max_new_tokens,
    }


def run_cell(bench: Workbench, split, settings: dict, rank: int, seed: int) -> dict:
    torch.manual_seed(seed)
    method = create_method("fedit", bench.layers, rank, scale=SCALE, seed=seed)
    train = TrainSpec(
        local_epochs=settings["epochs"],
        local_steps=None,
        batch_size=settings["batch_size"],
        lr=settings["lr"],
        max_seq_len=settings["max_seq_len"],
        train_head=False,
    )
    started = time.perf_counter()
    result = bench.train(method.client_init(0, rank), split.train, train, seed=seed)
    train_s = time.perf_counter() - started
    method.aggregate([result.update])
    evaluation = EvalSpec(max_examples=None, batch_size=16, max_new_tokens=settings["max_new_tokens"])
    per_task = {}
    for task in settings["tasks"]:
        held = [index for index, key in enumerate(split.test.keys) if key == task][: settings["eval_per_task"]]
        per_task[task] = bench.evaluate(
            method.global_delta(), split.test.subset(held), evaluation, max_seq_len=settings["max_seq_len"]
        ) | {"examples": len(held)}
    return {
        "rank": rank,
        "seed": seed,
        "train_loss": result.metrics["train_loss"],
        "train_s": train_s,
        "eval_s": time.perf_counter() - started - train_s,
        "per_task": per_task,
    }


def table(out: Path) -> str:
    cells = [json.loads(path.read_text()) for path in sorted(out.glob("r*-s*.json"))]
    if not cells:
        return f"no cells in {out}"
    tasks = list(cells[0]["per_task"])
    ranks = sorted({cell["rank"] for cell in cells})
    lines = [
        "| task | " + " | ".join(f"EM r{r} | ROUGE-L r{r}" for r in ranks) + " |",
        "|---|" + "---|---|" * len(ranks),
    ]
    for task in [*tasks, "mean"]:
        row = [task]
        for rank in ranks:
            at = [cell for cell in cells if cell["rank"] == rank]
            for metric in ("eval_exact_match", "eval_rougeL"):
                scored = tasks if task == "mean" else [task]
                values = [statistics.mean(cell["per_task"][t][metric] for t in scored) for cell in at]
                row.append(f"{statistics.mean(values):.3f} (n={len(values)})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    settings_file = args.out / "settings.json"
    saved = json.loads(settings_file.read_text()) if settings_file.is_file() else None
    if saved is not None and args.tasks is None:
        args.tasks = saved["tasks"]
    if not args.tasks:
        raise SystemExit("name --tasks for a new probe folder")
    settings = settings_of(args)
    if saved is None:
        settings_file.write_text(json.dumps(settings, indent=1) + "\n")
    elif saved != settings:
        changed = sorted(key for key in saved if saved[key] != settings[key])
        raise SystemExit(f"{args.out} holds probes of other settings ({', '.join(changed)}); use another --out")
    if args.threads:
        torch.set_num_threads(args.threads)
    split = load_dataset("bigbench", tasks=args.tasks, max_per_task=args.max_per_task)
    targets = tuple(args.targets) if args.targets else None
    bench = Workbench(export_base(load_base(ModelSpec(name=args.model, task="generation", target_modules=targets))))
    print(f"{len(split.train)} train, {len(split.test)} held out; {len(bench.layers)} target layers", flush=True)
    for seed in args.seeds:
        for rank in args.ranks:
            path = args.out / f"r{rank:02d}-s{seed}.json"
            if path.is_file():
                continue
            cell = run_cell(bench, split, settings, rank, seed)
            path.write_text(json.dumps(cell, indent=1) + "\n")
            mean_em = np.mean([task["eval_exact_match"] for task in cell["per_task"].values()])
            print(f"rank {rank} seed {seed}: mean EM {mean_em:.3f}, train {cell['train_s']:.0f} s", flush=True)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
