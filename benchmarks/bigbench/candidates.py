"""The BIG-bench JSON tasks a 135M model could learn with short sequences: the screen's pool.

Reads every ``task.json`` of the bigbench archive (~10 s) and keeps the tasks with at least
``--min-examples`` examples, no multiple-choice examples (the answer is text to generate),
a median target of at most ``--max-target`` characters (exact match means something) and a
median input of at most ``--max-input`` characters (a prompt fits in 64 tokens).

    .venv/bin/python benchmarks/bigbench/candidates.py > benchmarks/bigbench/candidates.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
from collections.abc import Sequence

from fedray.data.bigbench import ARCHIVE_NAME, bigbench_dir, task_name_of

#: task.json files larger than this hold images or geometry written as text: skipped.
MAX_TASK_BYTES = 5_000_000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-examples", type=int, default=250)
    parser.add_argument("--max-target", type=int, default=12)
    parser.add_argument("--max-input", type=int, default=250)
    args = parser.parse_args(argv)
    rows = []
    with tarfile.open(bigbench_dir() / ARCHIVE_NAME, "r:gz") as tar:
        for member in tar:
            name = task_name_of(member.name)
            if not name or member.size > MAX_TASK_BYTES:
                continue
            examples = json.load(tar.extractfile(member)).get("examples", [])
            if len(examples) < args.min_examples or any("target_scores" in example for example in examples):
                continue
            targets = [example["target"] for example in examples]
            target = statistics.median(len(t if isinstance(t, str) else t[0]) for t in targets)
            given = statistics.median(len(example["input"]) for example in examples)
            if target <= args.max_target and given <= args.max_input:
                rows.append((name, len(examples), target, given))
    print(
        f"{len(rows)} JSON tasks with at least {args.min_examples} examples, none multiple choice, median target "
        f"at most {args.max_target} and median input at most {args.max_input} characters:\n"
    )
    print("| task | examples | median target chars | median input chars |\n|---|---:|---:|---:|")
    for name, count, target, given in sorted(rows, key=lambda row: -row[1]):
        print(f"| {name} | {count} | {target:g} | {given:g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
