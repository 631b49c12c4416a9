"""Names of the metrics a run records, shared by the driver, the actor and reports."""

from __future__ import annotations

from fedray.config import Task

#: The headline evaluation metric of each task, as runs log it.
EVAL_METRICS: dict[Task, str] = {"classification": "eval_accuracy", "generation": "eval_rougeL"}
#: What always answering the evaluation set's majority class scores (logged once, at step 0).
MAJORITY_METRIC = "eval_majority_rate"
