import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def toy_registry(monkeypatch):
    """The process registry holding only the test toys (no entry points)."""
    from toy_plugin import TOYS

    from mdmrl import plugins

    reg = plugins.Registry()
    reg.register_plugin(TOYS, "toys", "mdmrl-tests", "0")
    monkeypatch.setattr(plugins, "_REGISTRY", reg)
    return reg


@pytest.fixture
def toy_recipe(tmp_path):
    from toy_plugin import TOY_RECIPE

    path = tmp_path / "toy.toml"
    path.write_text(TOY_RECIPE)
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny test models run fastest on one thread (many times faster than two threads
    spin-waiting on a busy machine), and the suite must not fight itself (or other
    work) for the machine's cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _back_to_one_thread():
    """Code under test may set torch's thread count (benchmark scripts' --threads, the
    pretraining's threads option); the next test starts on one thread again."""
    import torch

    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
