import pytest
import torch

from distributed import run_ranks

pytestmark = pytest.mark.timeout(120)
SHAPES = [(3, 4), (5,), (2, 2, 2), (1,)]


def _buffer(rank: int) -> torch.Tensor:
    """One flat message packing several tensors of mixed shapes, each value unique to its sender."""
    return torch.cat([(torch.full(s, float(rank)) + torch.arange(torch.Size(s).numel()).view(s) / 100).reshape(-1)
                      for s in SHAPES])


def _ring_exchange(comm):
    n, i = comm.world_size, comm.rank
    peers = [(i - 1) % n, (i + 1) % n]
    recv = {j: torch.full_like(_buffer(i), -1.0) for j in peers}
    comm.exchange({j: _buffer(i) for j in peers}, recv)
    return recv, comm.bytes_sent


def test_ring_exchange_receives_exactly_the_neighbours_buffers():
    out = run_ranks(_ring_exchange, 4)
    size = _buffer(0).numel() * 4
    for i, (recv, sent) in enumerate(out):
        assert sorted(recv) == sorted({(i - 1) % 4, (i + 1) % 4})
        for j, t in recv.items():
            assert torch.equal(t, _buffer(j)), (i, j)
        assert sent == 2 * size  # one message per edge and direction
