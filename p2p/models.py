"""Plain nn.Modules; they know nothing about distribution.

`build_model` seeds its own RNG from `model_seed`, so every node builds identical weights without
a broadcast, and the caller's torch RNG is left as it was.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from p2p.config import ConfigError, ModelConfig, import_callable

_RESNET_WIDTHS = (64, 128, 256, 512, 1024, 2048)  # every channel count a ResNet-50 norm layer sees


def _logistic(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes))


def _mlp(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(in_shape), cfg.hidden),
        nn.ReLU(),
        nn.Linear(cfg.hidden, num_classes),
    )


def _cnn(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two 3x3 conv blocks and a 2x2 adaptive pool: ~20k parameters, any input from 8x8 up."""
    return nn.Sequential(
        nn.Conv2d(in_shape[0], 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 32, H/2, W/2)
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),  # (B, 64, 2, 2) whatever the input size
        nn.Flatten(),
        nn.Linear(64 * 2 * 2, num_classes),
    )


def _resnet50(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """torchvision's ResNet-50 with GroupNorm(ceil(C / group_channels), C) instead of BatchNorm
    (batch statistics differ per node and cannot be averaged), plus Dropout2d after the stem and
    layers 1-3 and Dropout before the classifier, added by wrapping torchvision's own modules.
    """
    gc = cfg.group_channels
    if gc < 1:
        raise ConfigError("--model.group_channels must be >= 1")
    for c in _RESNET_WIDTHS:
        if c % math.ceil(c / gc):
            raise ConfigError(
                f"--model.group_channels {gc} gives {math.ceil(c / gc)} GroupNorm groups for {c} channels, "
                "which does not divide them: use a power of two such as 32"
            )
    for flag, p in (("drop_rate", cfg.drop_rate), ("last_drop_rate", cfg.last_drop_rate)):
        if not 0 <= p < 1:
            raise ConfigError(f"--model.{flag} must be in [0, 1), got {p}")

    def norm(c: int) -> nn.Module:
        return nn.GroupNorm(math.ceil(c / gc), c)

    import torchvision  # here, not at the top: seconds per rank that the small models don't need

    model = torchvision.models.resnet50(num_classes=num_classes, norm_layer=norm)
    if in_shape[0] != 3:  # e.g. 1-channel digits/MNIST: same stem, other input width
        model.conv1 = nn.Conv2d(in_shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    model.maxpool = nn.Sequential(model.maxpool, nn.Dropout2d(cfg.drop_rate))
    model.layer1 = nn.Sequential(model.layer1, nn.Dropout2d(cfg.drop_rate))
    model.layer2 = nn.Sequential(model.layer2, nn.Dropout2d(cfg.drop_rate))
    model.layer3 = nn.Sequential(model.layer3, nn.Dropout2d(cfg.drop_rate))
    model.fc = nn.Sequential(nn.Dropout(cfg.last_drop_rate), model.fc)
    return model


class _Block(nn.Module):
    """Pre-LayerNorm: x + attention(LN(x)), then x + MLP(LN(x)), the MLP 4x wide (nanoGPT's block)."""

    def __init__(self, embed: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(embed), nn.LayerNorm(embed)
        self.qkv, self.proj = nn.Linear(embed, 3 * embed), nn.Linear(embed, embed)
        self.mlp = nn.Sequential(nn.Linear(embed, 4 * embed), nn.GELU(), nn.Linear(4 * embed, embed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, E)
        B, T, E = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(E, dim=-1)
        q, k, v = (t.view(B, T, self.heads, E // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, T, E/H)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, E))
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    """A nanoGPT-shaped character model: token + position embeddings, pre-LN causal self-attention blocks, a final
    LayerNorm and the output layer (tied to the token embedding by default). Logits (B, T, V); no buffers and no
    BatchNorm, so the simulator batches it. Its own `loss` is the mean cross-entropy over every position."""

    def __init__(self, vocab: int, seq_len: int, layers: int, heads: int, embed: int, tie_weights: bool):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, embed), nn.Embedding(seq_len, embed)
        self.blocks = nn.Sequential(*[_Block(embed, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(embed)
        self.head = nn.Linear(embed, vocab, bias=False)
        for m in self.modules():  # GPT-2's initialisation
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        if tie_weights:
            self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) token ids -> (B, T, V)
        x = self.tok(idx) + self.pos.weight[:idx.shape[-1]]
        return self.head(self.ln(self.blocks(x)))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten())


def _transformer(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(in_shape) != 1:
        raise ConfigError(f"--model.name transformer reads token windows (--data.name text), not samples of shape "
                          f"{in_shape}")
    return TransformerLM(num_classes, in_shape[0], cfg.layers, cfg.heads, cfg.embed, cfg.tie_weights)


_MODELS = {"logistic": _logistic, "mlp": _mlp, "cnn": _cnn, "resnet50": _resnet50, "transformer": _transformer}


def build_model(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the model on CPU from `model_seed`, identically on every node.

    `cfg.name` may be the user's own `module:callable` with the built-in builders' signature,
    `build(cfg: ModelConfig, in_shape: tuple[int, ...], num_classes: int) -> nn.Module`, called under the same
    seed (docs/library.md, "Your model and data in train.py").

    Args:
        in_shape: (C, H, W) of one sample, e.g. `Splits.in_shape`.
    """
    if ":" in cfg.name:
        build = import_callable(cfg.name, "model.name")
    elif cfg.name in _MODELS:
        build = _MODELS[cfg.name]
    else:
        raise ConfigError(f"--model.name: unknown model {cfg.name!r}; choose {', '.join(_MODELS)} or module:callable")
    # Seed only the CPU generator (torch.manual_seed would also reseed every CUDA device, which
    # fork_rng(devices=[]) does not restore); the caller's CPU RNG state comes back on exit.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(cfg.model_seed)
        model = build(cfg, tuple(in_shape), num_classes)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"--model.name {cfg.name} returned a {type(model).__name__}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"--model.name {cfg.name} returned a model without trainable parameters")
    return model
