import pytest
import torch


@pytest.fixture
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference's small per-op matmuls: a second thread only adds latency
    yield
    torch.set_num_threads(threads)
