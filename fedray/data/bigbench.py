"""BIG-bench tasks as generation data, read offline from the PyPI sdist of ``bigbench``.

The sdist (1.0.0, Apache-2.0, 358 MB) holds every task's ``task.json``: inputs, targets and,
for multiple-choice examples, target scores. Installing it pulls TensorFlow and a direct-URL
dependency that pip refuses (``pip download`` fails on it too), so fedray never installs it:
``fetch_archive`` downloads the archive once from the package index into fedray's cache
and checks its SHA-256, and ``load_tasks`` reads the chosen tasks' JSON straight from it,
keeping each task it extracted in the cache (the archive scan takes ~10 s, a cached task
milliseconds).

Task names are the folders under ``bigbench/benchmark_tasks``: ``word_unscrambling``, or
``task/subtask`` for a JSON subtask (``natural_instructions/subtask033_...``). Programmatic
tasks (``task.py``) have no JSON and are refused.

An example becomes one prompt and one target, in BIG-bench's zero-shot JSON format: the
task's prefix, the example-input prefix (default ``"\\nQ: "``), the input, for a multiple-
choice example its choices (each after the choice prefix, default ``"\\n  choice: "``), and
the example-output prefix (default ``"\\nA: "``). The target is the first listed target, or
for a multiple-choice example the choice with the highest score.

    python -m fedray.data.bigbench fetch          # once per machine (``make bigbench``)
    python -m fedray.data.bigbench list [WORD]    # the JSON tasks the archive holds
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from fedray.data.dataset import TextDataset

VERSION = "1.0.0"
ARCHIVE_NAME = f"bigbench-{VERSION}.tar.gz"
#: The sdist's SHA-256 as PyPI lists it; a download that differs is refused.
ARCHIVE_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
ARCHIVE_BYTES = 358_249_635
#: Where the tasks sit inside the archive.
TASKS_ROOT = f"bigbench-{VERSION}/bigbench/benchmark_tasks/"
#: The package index, as pip's PIP_INDEX_URL names it.
DEFAULT_INDEX_URL = "https://pypi.org/simple"
#: Seconds the index may take to answer.
INDEX_TIMEOUT_S = 30
#: Download progress is printed after each this many bytes.
PROGRESS_EVERY_BYTES = 50_000_000
#: BIG-bench's defaults for a JSON task's prompt parts.
DEFAULT_INPUT_PREFIX = "\nQ: "
DEFAULT_OUTPUT_PREFIX = "\nA: "
DEFAULT_CHOICE_PREFIX = "\n  choice: "
#: Seed of the fixed choice of examples that max_per_task keeps.
SUBSET_SEED = 0


def bigbench_dir(cache_dir: str | Path | None = None) -> Path:
    """The folder of the archive and the extracted tasks: ``bigbench`` in fedray's cache
    (``cache_dir``, else $FEDRAY_CACHE, else ~/.cache/fedray)."""
    from fedray.models.registry import default_cache_dir

    return (Path(cache_dir).expanduser() if cache_dir else default_cache_dir()) / "bigbench"


def _missing_archive(path: Path) -> ValueError:
    return ValueError(
        f"BIG-bench tasks are read from the bigbench {VERSION} sdist ({ARCHIVE_BYTES / 1e6:.0f} MB), which is not "
        f"at {path}: run `make bigbench` (or `python -m fedray.data.bigbench fetch`) to fetch it from the package "
        f"index, or copy {ARCHIVE_NAME} there (dataset_options.archive names another path)"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _archive_url(index_url: str) -> str:
    """The archive's download URL, from the index's simple JSON page (PEP 691)."""
    page = urllib.parse.urljoin(index_url.rstrip("/") + "/", "bigbench/")
    request = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=INDEX_TIMEOUT_S) as response:
            files = json.load(response)["files"]
    except (urllib.error.URLError, TimeoutError, ValueError, KeyError) as error:
        raise ConnectionError(f"the package index at {page} does not list bigbench ({error})") from None
    for entry in files:
        if entry["filename"] == ARCHIVE_NAME:
            return urllib.parse.urljoin(page, entry["url"])
    raise ConnectionError(f"the package index at {page} has no {ARCHIVE_NAME}")


def fetch_archive(cache_dir: str | Path | None = None, index_url: str | None = None, progress: bool = True) -> Path:
    """The archive in the cache, downloaded from the package index first if it is not there."""
    target = bigbench_dir(cache_dir) / ARCHIVE_NAME
    if target.is_file() and _sha256(target) == ARCHIVE_SHA256:
        return target
    url = _archive_url(index_url or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX_URL)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".part")
    digest, done, shown = hashlib.sha256(), 0, 0
    with urllib.request.urlopen(url, timeout=INDEX_TIMEOUT_S) as response, partial.open("wb") as handle:
        for block in iter(lambda: response.read(1 << 20), b""):
            handle.write(block)
            digest.update(block)
            done += len(block)
            if progress and done - shown >= PROGRESS_EVERY_BYTES:
                shown = done
                print(f"bigbench: {done / 1e6:.0f} of {ARCHIVE_BYTES / 1e6:.0f} MB", file=sys.stderr, flush=True)
    if digest.hexdigest() != ARCHIVE_SHA256:
        partial.unlink()
        raise ValueError(f"{url} has SHA-256 {digest.hexdigest()}, not the pinned {ARCHIVE_SHA256}; nothing kept")
    partial.replace(target)
    return target


def _cached_task(cache: Path, name: str) -> Path:
    return cache / "tasks" / f"{name.replace('/', '__')}.json"


def task_name_of(member: str) -> str | None:
    """``word_unscrambling`` for ``.../benchmark_tasks/word_unscrambling/task.json``, else None."""
    if not (member.startswith(TASKS_ROOT) and member.endswith("/task.json")):
        return None
    return member[len(TASKS_ROOT) : -len("/task.json")]


def list_tasks(archive: Path) -> list[str]:
    """Every JSON task and subtask in the archive, sorted."""
    with tarfile.open(archive, "r:gz") as tar:
        return sorted(name for name in map(task_name_of, tar.getnames()) if name)


def load_tasks(
    names: Sequence[str], cache_dir: str | Path | None = None, archive: str | Path | None = None
) -> dict[str, dict]:
    """Each named task's ``task.json``, from the cache, else extracted from the archive (and cached)."""
    cache = bigbench_dir(cache_dir)
    tasks = {name: json.loads(path.read_text()) for name in names if (path := _cached_task(cache, name)).is_file()}
    missing = [name for name in names if name not in tasks]
    if not missing:
        return tasks
    archive_path = Path(archive).expanduser() if archive else cache / ARCHIVE_NAME
    if not archive_path.is_file():
        raise _missing_archive(archive_path)
    found = {}
    with tarfile.open(archive_path, "r:gz") as tar:
        for member in tar:
            if task_name_of(member.name) in missing:
                found[task_name_of(member.name)] = tar.extractfile(member).read()
    if unknown := [name for name in missing if name not in found]:
        known = list_tasks(archive_path)
        described = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=3)
            described.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ValueError(
            f"no JSON task {'; '.join(described)} in {ARCHIVE_NAME}; `python -m fedray.data.bigbench list` prints them"
        )
    for name, raw in found.items():
        path = _cached_task(cache, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Workers of one node may extract at once: each writes its own file, then renames it.
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_bytes(raw)
        partial.replace(path)
        tasks[name] = json.loads(raw)
    return tasks


def example_pairs(task: dict) -> list[tuple[str, str]]:
    """(prompt, target) per example of a ``task.json``, in its order (see the module notes)."""
    prefix = task.get("task_prefix", "")
    input_prefix = task.get("example_input_prefix", DEFAULT_INPUT_PREFIX)
    output_prefix = task.get("example_output_prefix", DEFAULT_OUTPUT_PREFIX)
    choice_prefix = task.get("choice_prefix", DEFAULT_CHOICE_PREFIX)
    append_choices = task.get("append_choices_to_input", True)
    pairs = []
    for example in task["examples"]:
        scores = example.get("target_scores")
        if scores:
            target = max(scores, key=lambda choice: scores[choice])  # the first of the best
            choices = "".join(choice_prefix + choice for choice in scores) if append_choices else ""
        else:
            listed = example["target"]
            target = listed if isinstance(listed, str) else listed[0]
            choices = ""
        prompt = (prefix + input_prefix + example["input"] + choices + output_prefix).lstrip()
        target = str(target).strip()
        if prompt.endswith(" "):  # BPE tokenizers read a word together with the space before it
            prompt, target = prompt[:-1], " " + target
        pairs.append((prompt, target))
    return pairs


def bigbench_dataset(
    tasks: Iterable[str],
    *,
    max_per_task: int | None = None,
    cache_dir: str | Path | None = None,
    archive: str | Path | None = None,
) -> TextDataset:
    """The named tasks as one generation dataset keyed by task, repeated prompts dropped;
    with ``max_per_task``, a fixed random choice of that many examples of each task."""
    names = list(dict.fromkeys(tasks))
    if not names:
        raise ValueError("dataset bigbench needs dataset_options.tasks: a list of BIG-bench task names")
    if max_per_task is not None and max_per_task < 2:
        raise ValueError(f"dataset_options.max_per_task={max_per_task} must be at least 2")
    loaded = load_tasks(names, cache_dir, archive)
    seen: set[str] = set()
    texts, targets, keys = [], [], []
    for name in names:
        pairs = []
        for prompt, target in example_pairs(loaded[name]):
            if prompt not in seen and target.strip():
                seen.add(prompt)
                pairs.append((prompt, target))
        if max_per_task is not None and len(pairs) > max_per_task:
            chosen = np.random.default_rng(SUBSET_SEED).choice(len(pairs), size=max_per_task, replace=False)
            pairs = [pairs[index] for index in sorted(chosen)]
        texts += [prompt for prompt, _ in pairs]
        targets += [target for _, target in pairs]
        keys += [name] * len(pairs)
    return TextDataset(name="bigbench", task="generation", texts=texts, targets=targets, keys=keys)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedray.data.bigbench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help=f"download {ARCHIVE_NAME} into fedray's cache (once)")
    fetch.add_argument("--index-url", help=f"package index (default $PIP_INDEX_URL, else {DEFAULT_INDEX_URL})")
    listing = commands.add_parser("list", help="the JSON tasks the archive holds")
    listing.add_argument("word", nargs="?", default="", help="only names that contain this")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(f"bigbench: {fetch_archive(index_url=args.index_url)}")
            return 0
        archive = bigbench_dir() / ARCHIVE_NAME
        if not archive.is_file():
            raise _missing_archive(archive)
        print("\n".join(name for name in list_tasks(archive) if args.word in name))
        return 0
    except (ValueError, ConnectionError) as error:
        print(f"bigbench: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
