"""BIG-bench tasks from the bigbench sdist: fetched once, read without installing, split by task.

The tests build a small archive with the sdist's layout (the real one is 358 MB)."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import pytest

from fedray.data import bigbench, load_dataset
from fedray.data.bigbench import ARCHIVE_NAME, TASKS_ROOT, example_pairs, fetch_archive, load_tasks
from fedray.worker.evaluation import answer_text

PLURALS = {
    "example_input_prefix": "This is a ",
    "example_output_prefix": ". Now there is another one. There are two ",
    "examples": [{"input": f"word{i}", "target": f"word{i}s"} for i in range(20)],
}
CHOICES = {
    "task_prefix": "Pick one.",
    "examples": [
        {"input": "Is fire hot?", "target_scores": {"no": 0, "yes": 1}},
        {"input": "Is ice hot?", "target_scores": {"no": 1, "yes": 0, "maybe": 1}},
    ],
}
LISTED = {
    "examples": [{"input": f"q{i}", "target": [f"a{i}", "other"]} for i in range(10)]
    + [{"input": "q0", "target": "again"}]  # a repeated prompt
}


def _archive(path: Path, tasks: dict[str, dict]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, task in tasks.items():
            raw = json.dumps(task).encode()
            member = tarfile.TarInfo(f"{TASKS_ROOT}{name}/task.json")
            member.size = len(raw)
            tar.addfile(member, io.BytesIO(raw))
        readme = tarfile.TarInfo(f"{TASKS_ROOT}programmatic/task.py")
        tar.addfile(readme, io.BytesIO(b""))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """fedray's cache with a small archive of three tasks where the real one would be."""
    monkeypatch.setenv("FEDRAY_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "bigbench"
    folder.mkdir(parents=True)
    _archive(folder / ARCHIVE_NAME, {"plural": PLURALS, "quiz/choices": CHOICES, "listed": LISTED})
    return folder


def test_prompts_follow_the_json_format_and_targets_the_best_choice():
    (first, *_) = example_pairs(PLURALS)
    # The space before the answer goes with the target: BPE tokenizers read " word0s" as one piece.
    assert first == ("This is a word0. Now there is another one. There are two", " word0s")
    fire, ice = example_pairs(CHOICES)
    assert fire == ("Pick one.\nQ: Is fire hot?\n  choice: no\n  choice: yes\nA:", " yes")
    assert ice[1] == " no"  # the first of the best scores
    assert example_pairs(LISTED)[0] == ("Q: q0\nA:", " a0")


def test_tasks_are_read_from_the_archive_once_then_from_the_cache(cache):
    tasks = load_tasks(["plural", "quiz/choices"])
    assert tasks["quiz/choices"] == CHOICES
    (cache / ARCHIVE_NAME).unlink()  # read from the cache now, not the archive
    assert load_tasks(["plural", "quiz/choices"]) == tasks
    with pytest.raises(ValueError, match=r"not at .*bigbench-1.0.0.tar.gz: run `make bigbench`"):
        load_tasks(["listed"])


def test_an_unknown_task_is_named_with_the_close_ones(cache):
    with pytest.raises(ValueError, match=r"no JSON task 'plurals' \(did you mean plural\?\)"):
        load_tasks(["plurals"])
    with pytest.raises(ValueError, match=r"no JSON task 'programmatic'"):
        load_tasks(["programmatic"])


def test_the_split_holds_out_part_of_every_task_and_ignores_the_run_seed(cache):
    split = load_dataset("bigbench", tasks=["plural", "listed", "quiz/choices"], test_fraction=0.2)
    assert split.train.task == "generation"
    # Repeated prompts are dropped (LISTED's last example repeats q0).
    prompts = {prompt for task in (PLURALS, LISTED, CHOICES) for prompt, _ in example_pairs(task)}
    assert sorted(split.train.texts + split.test.texts) == sorted(prompts)
    held = {key: split.test.keys.count(key) for key in ("plural", "listed", "quiz/choices")}
    assert held == {"plural": 4, "listed": 2, "quiz/choices": 1}
    assert set(split.train.texts).isdisjoint(split.test.texts)
    other_seed = load_dataset("bigbench", tasks=["plural", "listed", "quiz/choices"], test_fraction=0.2, split_seed=7)
    assert other_seed.test.texts == split.test.texts
    # max_per_task: a fixed choice of that many examples of each task.
    few = load_dataset("bigbench", tasks=["plural", "listed"], max_per_task=5)
    assert [(few.train.keys + few.test.keys).count(key) for key in ("plural", "listed")] == [5, 5]


def test_bad_options_are_one_clear_error(cache):
    with pytest.raises(ValueError, match=r"needs dataset_options\.tasks"):
        load_dataset("bigbench")
    with pytest.raises(ValueError, match=r"takes dataset_options\.max_per_task, not max_examples"):
        load_dataset("bigbench", tasks=["plural"], max_examples=10)
    with pytest.raises(ValueError, match=r"options \['tasks'\] are for dataset bigbench, not 'rotten_tomatoes'"):
        load_dataset("rotten_tomatoes", tasks=["plural"])


@pytest.fixture
def index(tmp_path):
    """A package index on loopback that lists a small bigbench archive (PEP 691 JSON)."""
    served = tmp_path / "served"
    served.mkdir()
    _archive(served / ARCHIVE_NAME, {"plural": PLURALS})
    page = json.dumps({"files": [{"filename": ARCHIVE_NAME, "url": f"../files/{ARCHIVE_NAME}"}]}).encode()

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = page if self.path == "/simple/bigbench/" else (served / ARCHIVE_NAME).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/simple", served / ARCHIVE_NAME
    server.shutdown()


def test_fetch_keeps_only_the_pinned_archive(tmp_path, index, monkeypatch):
    url, served = index
    with pytest.raises(ValueError, match="not the pinned"):
        fetch_archive(tmp_path / "cache", index_url=url, progress=False)
    assert list((tmp_path / "cache" / "bigbench").iterdir()) == []  # nothing half-written kept
    monkeypatch.setattr(bigbench, "ARCHIVE_SHA256", hashlib.sha256(served.read_bytes()).hexdigest())
    fetched = fetch_archive(tmp_path / "cache", index_url=url, progress=False)
    assert fetched.read_bytes() == served.read_bytes()
    assert fetch_archive(tmp_path / "cache", index_url="http://127.0.0.1:9/simple") == fetched  # no second download
    with pytest.raises(ConnectionError, match="does not list bigbench"):
        fetch_archive(tmp_path / "other", index_url="http://127.0.0.1:9/simple")


def test_exact_match_compares_the_answer_line():
    assert answer_text(" Abilities.\nQ: next") == answer_text("abilities") == "abilities"
    assert answer_text("'1'") != answer_text("''")
