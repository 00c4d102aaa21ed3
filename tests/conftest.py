import os

# No network here: keep the Hub libraries offline and quiet.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# One torch thread per test process: the models here are tiny, and two pytest-xdist workers (or a
# busy machine) with torch's default of one thread per core oversubscribe the cores, where torch's
# spinning threads run tiny models ~30× slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402

from tiny_models import build_tiny_model, build_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    """A tiny random Llama saved to a folder (hidden 32); test files needing another size define their own."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden=32))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()
