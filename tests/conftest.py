import pytest
import torch

from images import make_workdir


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A decoded-image cache of the test's own (CHIP_CACHE_DIR, which child processes inherit): never the user's."""
    monkeypatch.setenv("CHIP_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def one_thread(monkeypatch):
    """One thread, as torchrun's processes have: the same float sums everywhere (and no stalls on a busy machine,
    where a team of threads waits for its slowest). Child processes inherit it through the environment."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A 10-class image folder (4 train, 2 test 32x32 PNGs per class) and a ResNet-20 model file, r20.pt."""
    return make_workdir(tmp_path_factory.mktemp("work"), {"train": 4, "test": 2})


@pytest.fixture
def out(tmp_path):
    """An empty folder for the outputs of a command that must write none."""
    (tmp_path / "out").mkdir()
    return tmp_path / "out"
