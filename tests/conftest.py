import pytest
import torch


@pytest.fixture
def one_thread(tmp_path, monkeypatch):
    """One thread, as torchrun's processes have: the same float sums everywhere (and no stalls on a busy machine,
    where a team of threads waits for its slowest); a decoded-image cache of the test's own. Child processes
    inherit both through the environment."""
    monkeypatch.setenv("CHIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
