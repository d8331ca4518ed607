"""CHOCO-SGD's compressors Q (ALGORITHMS.md, choco): a flat vector in, a few flat tensors out.

Both ends build the same `Compressor(kind, numel, ratio, dtype)`, so the receiver knows every payload tensor's
size and dtype in advance (`shapes`, `empty_payload`) and the tensors travel with plain isend/irecv.
Pure torch, no torch.distributed. With b = the dtype's bytes per entry and k = `Compressor.k`:

    none    "values" (numel)                                   numel * b bytes
    topk    "values" (k), "indices" (k, int32)                 k * (b + 4)
    randk   "values" (k); both ends draw the indices           k * b
    qsgd8   "codes" (numel, int8), "scales" (chunks, float32)  numel + 4 * ceil(numel / QSGD_CHUNK)

randk and qsgd8 draw from a generator seeded with the message's seed (`message_seed`), on the tensor's
device: both ends must use the same device type (they do, one backend per run), as CPU and CUDA draw
different streams.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

COMPRESSORS = ("none", "topk", "randk", "qsgd8")
# Entries per qsgd8 scale. The scale costs 4 bytes per chunk: 0.4% of the 1 byte per entry at 1024 (the
# payload is 3.98x smaller than float32), while smaller chunks keep the step s/127 small: one large entry,
# or a layer of large weights next to small biases in the flat vector, only coarsens its own 1024 entries.
QSGD_CHUNK = 1024


def message_seed(seed: int, sender: int, round: int) -> int:
    """The seed of sender's message of one round (CHOCO sends the same q_i to every neighbour), equal at both
    ends; SeedSequence mixes the three so that neighbouring (sender, round) pairs get unrelated streams."""
    return int(np.random.SeedSequence((seed, sender, round)).generate_state(1, np.uint64)[0])


@dataclass(frozen=True)
class Compressor:
    kind: str  # none | topk | randk | qsgd8
    numel: int  # length of the flat vector, the same at both ends
    ratio: float = 1.0  # topk, randk: the fraction rho of entries that travel
    dtype: torch.dtype = torch.float32  # of the vector, and of the values that travel

    def __post_init__(self) -> None:
        if self.kind not in COMPRESSORS:
            raise ValueError(f"unknown compressor {self.kind!r}; choose one of {', '.join(COMPRESSORS)}")
        if not 1 <= self.numel < 2**31:  # int32 indices
            raise ValueError(f"compressor {self.kind}: numel must be in 1..2^31-1, got {self.numel}")
        if self.kind in ("topk", "randk") and not 0 < self.ratio <= 1:
            raise ValueError(f"compressor {self.kind}: ratio must be in (0, 1], got {self.ratio}")

    @property
    def k(self) -> int:
        """Entries topk and randk keep: ratio * numel rounded to the nearest integer (not floor or ceil, which
        float noise would push off: 0.29 * 100 = 28.999...), at least 1."""
        return max(1, min(self.numel, round(self.ratio * self.numel)))

    def shapes(self) -> dict[str, tuple[int, torch.dtype]]:
        """Name -> (length, dtype) of each flat payload tensor, in the order they travel."""
        if self.kind == "none":
            return {"values": (self.numel, self.dtype)}
        if self.kind == "topk":
            return {"values": (self.k, self.dtype), "indices": (self.k, torch.int32)}
        if self.kind == "randk":
            return {"values": (self.k, self.dtype)}
        return {"codes": (self.numel, torch.int8), "scales": (math.ceil(self.numel / QSGD_CHUNK), torch.float32)}

    def nbytes(self) -> int:
        """The exact bytes of one message (what `bytes_sent` counts)."""
        return sum(n * dtype.itemsize for n, dtype in self.shapes().values())

    def empty_payload(self, device: torch.device | str) -> dict[str, Tensor]:
        """Receive buffers for one message."""
        return {name: torch.empty(n, dtype=dtype, device=device) for name, (n, dtype) in self.shapes().items()}

    def compress(self, x: Tensor, seed: int) -> dict[str, Tensor]:
        """Q(x) as fresh tensors (a private copy: x may change while they travel).

        Args:
            x: the flat (numel,) vector, e.g. w_i - x̂_i.
            seed: `message_seed(...)` of this message; randk and qsgd8 draw from it, none and topk ignore it.
        """
        if x.shape != (self.numel,) or x.dtype != self.dtype:
            raise ValueError(f"compressor {self.kind}: expected a ({self.numel},) {self.dtype} vector, "
                             f"got {tuple(x.shape)} {x.dtype}")
        x = x.detach()
        if self.kind == "none":
            return {"values": x.clone()}
        if self.kind == "topk":
            idx = x.abs().topk(self.k, sorted=False).indices
            return {"values": x[idx], "indices": idx.to(torch.int32)}
        if self.kind == "randk":
            return {"values": x[self._random_indices(seed, x.device)]}
        # qsgd8: per chunk u = 127 x / s in [-127, 127], s = max |x|; q = floor(u + U[0, 1)) is unbiased, E q = u
        chunks = self._chunks(x.float())  # (chunks, QSGD_CHUNK)
        scales = chunks.abs().amax(dim=1)
        u = chunks * (127 / torch.where(scales > 0, scales, 1.0))[:, None]
        noise = torch.rand(u.shape, generator=self._generator(seed, x.device), device=x.device)
        codes = torch.floor(u + noise).clamp_(-127, 127).to(torch.int8)
        return {"codes": codes.flatten()[: self.numel].clone(), "scales": scales}

    def decompress(self, payload: dict[str, Tensor], seed: int) -> Tensor:
        """The (numel,) vector Q(x) the sender meant; randk needs the sender's `seed` to redraw the indices."""
        if self.kind == "none":
            return payload["values"]
        if self.kind == "qsgd8":
            chunks = self._chunks(payload["codes"].float()) * (payload["scales"] / 127)[:, None]
            return chunks.flatten()[: self.numel].to(self.dtype)
        values = payload["values"]
        out = torch.zeros(self.numel, dtype=self.dtype, device=values.device)
        idx = payload["indices"].long() if self.kind == "topk" else self._random_indices(seed, values.device)
        out[idx] = values
        return out

    def _generator(self, seed: int, device: torch.device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    def _random_indices(self, seed: int, device: torch.device) -> Tensor:
        """k distinct indices, the same at both ends for the same seed (and device type)."""
        return torch.randperm(self.numel, generator=self._generator(seed, device), device=device)[: self.k]

    def _chunks(self, x: Tensor) -> Tensor:
        """(numel,) -> (chunks, QSGD_CHUNK), the last chunk padded with zeros (padding never travels)."""
        pad = -self.numel % QSGD_CHUNK
        return torch.nn.functional.pad(x, (0, pad)).view(-1, QSGD_CHUNK)
