"""CHOCO's compressors, in-process: exact sizes, the kept entries, shared random draws, unbiased quantization."""

import math

import pytest
import torch

from p2p.compress import COMPRESSORS, QSGD_CHUNK, Compressor, message_seed

pytestmark = pytest.mark.timeout(60)


def vector(numel: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed))


def test_none_round_trip_is_exact_and_a_private_copy():
    x = vector(1000)
    c = Compressor("none", 1000)
    payload = c.compress(x, seed=0)
    x_before = x.clone()
    x += 1  # the sender moves on while the message travels
    assert torch.equal(c.decompress(payload, seed=0), x_before)


@pytest.mark.parametrize("ratio,numel,k", [(0.1, 1000, 100), (0.29, 100, 29), (1e-4, 1000, 1), (1.0, 7, 7),
                                           (0.25, 10, 2)])  # round(2.5) = 2: to nearest, ties to even
def test_k_is_the_rounded_fraction(ratio, numel, k):
    assert Compressor("topk", numel, ratio).k == k == Compressor("randk", numel, ratio).k


def test_topk_keeps_exactly_the_k_largest_magnitudes():
    x = vector(1000)
    c = Compressor("topk", 1000, ratio=0.05)
    payload = c.compress(x, seed=0)
    assert payload["indices"].dtype == torch.int32 and len(payload["values"]) == c.k == 50
    out = c.decompress(payload, seed=0)
    kept = out != 0
    assert kept.sum() == 50 and torch.equal(out[kept], x[kept])
    assert x[kept].abs().min() > x[~kept].abs().max()  # no dropped entry is larger than a kept one
    assert torch.equal(Compressor("topk", 1000, ratio=1.0).decompress(
        Compressor("topk", 1000, ratio=1.0).compress(x, seed=0), seed=0), x)


def test_randk_draws_the_same_indices_at_both_ends():
    x = vector(500)
    sender, receiver = Compressor("randk", 500, ratio=0.1), Compressor("randk", 500, ratio=0.1)
    seed = message_seed(7, sender=3, round=12)
    payload = sender.compress(x, seed)
    assert list(payload) == ["values"] and len(payload["values"]) == 50  # only values travel
    out = receiver.decompress({"values": payload["values"].clone()}, seed)
    kept = out != 0
    assert kept.sum() == 50 and torch.equal(out[kept], x[kept])
    other = receiver.decompress(payload, message_seed(7, sender=3, round=13))  # another round draws others
    assert not torch.equal(other != 0, kept)


def test_message_seeds_are_deterministic_and_distinct():
    seeds = {message_seed(s, i, r) for s in range(3) for i in range(8) for r in range(50)}
    assert len(seeds) == 3 * 8 * 50
    assert message_seed(1, 2, 3) == message_seed(1, 2, 3)


def test_qsgd8_error_is_below_one_step_per_chunk():
    numel = 2 * QSGD_CHUNK + 100  # a partial last chunk
    x = vector(numel) * torch.linspace(0.01, 10, numel)  # chunks of very different magnitudes
    x[QSGD_CHUNK:2 * QSGD_CHUNK] = 0  # an all-zero chunk
    c = Compressor("qsgd8", numel)
    payload = c.compress(x, seed=1)
    assert payload["codes"].dtype == torch.int8 and payload["scales"].shape == (3,)
    out = c.decompress(payload, seed=1)
    for chunk in range(3):
        part = slice(chunk * QSGD_CHUNK, (chunk + 1) * QSGD_CHUNK)
        s = x[part].abs().max()
        assert payload["scales"][chunk] == s
        assert (out[part] - x[part]).abs().max() <= s / 127 * (1 + 1e-6)  # one quantization step
    assert torch.equal(out[QSGD_CHUNK:2 * QSGD_CHUNK], torch.zeros(QSGD_CHUNK))


def test_qsgd8_is_unbiased():
    """The mean of N draws has per-entry standard deviation <= step / (2 sqrt N) (a rounding is a Bernoulli
    of variance <= 1/4 steps^2); 6 of those bound every entry of this vector."""
    numel, draws = 1500, 2000
    x = vector(numel)
    c = Compressor("qsgd8", numel)
    mean = sum(c.decompress(c.compress(x, message_seed(0, 0, r)), seed=0).double() for r in range(draws)) / draws
    step = torch.repeat_interleave(c.compress(x, 0)["scales"].double() / 127, QSGD_CHUNK)[:numel]
    assert ((mean - x.double()).abs() <= 6 * step / (2 * math.sqrt(draws))).all()
    assert (c.decompress(c.compress(x, 0), 0) - x).abs().max() > 1e-4  # it does quantize


@pytest.mark.parametrize("kind", COMPRESSORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_payload_bytes_and_shapes_are_what_travels(kind, dtype):
    numel = 3000
    c = Compressor(kind, numel, ratio=0.1, dtype=dtype)
    payload = c.compress(vector(numel).to(dtype), seed=5)
    assert {name: (len(t), t.dtype) for name, t in payload.items()} == c.shapes()
    assert all(t.is_contiguous() for t in payload.values())
    assert c.nbytes() == sum(t.nbytes for t in payload.values())
    empty = c.empty_payload("cpu")
    assert {name: (len(t), t.dtype) for name, t in empty.items()} == c.shapes()
    assert c.decompress(payload, seed=5).dtype == dtype
    expected = {"none": numel * dtype.itemsize, "topk": 300 * (dtype.itemsize + 4), "randk": 300 * dtype.itemsize,
                "qsgd8": numel + 4 * 3}[kind]
    assert c.nbytes() == expected


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown compressor 'top1'"):
        Compressor("top1", 10)
    with pytest.raises(ValueError, match="topk: ratio must be in \\(0, 1\\], got 0"):
        Compressor("topk", 10, ratio=0)
    with pytest.raises(ValueError, match="randk: ratio must be in \\(0, 1\\], got 1.5"):
        Compressor("randk", 10, ratio=1.5)
    with pytest.raises(ValueError, match="numel must be in 1..2\\^31-1, got 0"):
        Compressor("none", 0)
    with pytest.raises(ValueError, match="expected a \\(10,\\) torch.float32 vector, got \\(11,\\)"):
        Compressor("qsgd8", 10).compress(torch.zeros(11), seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("kind", COMPRESSORS)
def test_on_cuda_both_ends_agree(kind):
    """Draws use the tensor's device generator: the same seed gives the same message on two CUDA ends."""
    x = vector(5000).cuda()
    c = Compressor(kind, 5000, ratio=0.1)
    seed = message_seed(0, 1, 2)
    a, b = c.compress(x, seed), c.compress(x, seed)
    assert all(torch.equal(a[name], b[name]) for name in a)
    out = c.decompress({name: t.clone() for name, t in a.items()}, seed)
    assert out.device == x.device and (out - x).abs().max() <= (x.abs().max() if kind != "none" else 0)
    if kind in ("topk", "randk"):
        kept = out != 0
        assert kept.sum() == c.k and torch.equal(out[kept], x[kept])
