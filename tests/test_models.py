"""Model construction: shapes, seeding, ResNet-50's GroupNorm and dropout."""

import math

import pytest
import torch
import torch.nn as nn

from p2p.config import ConfigError, ModelConfig
from p2p.models import build_model

pytestmark = pytest.mark.timeout(120)

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]


def _forward_backward(model: nn.Module, in_shape: tuple[int, ...], classes: int = 10) -> None:
    out = model(torch.randn(2, *in_shape))
    assert out.shape == (2, classes)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["logistic", "mlp", "cnn"])
@pytest.mark.parametrize("in_shape", SHAPES)
def test_small_models(name, in_shape):
    model = build_model(ModelConfig(name=name, hidden=32), in_shape, 10)
    _forward_backward(model, in_shape)
    if name == "cnn":
        assert sum(p.numel() for p in model.parameters()) < 100_000


@pytest.mark.parametrize("in_shape", [(3, 32, 32), (1, 8, 8)])
def test_resnet50_forward_backward(in_shape):
    model = build_model(ModelConfig(name="resnet50"), in_shape, 10)
    _forward_backward(model, in_shape)


def test_resnet50_groupnorm_and_dropout():
    cfg = ModelConfig(name="resnet50", group_channels=32, drop_rate=0.1, last_drop_rate=0.3)
    model = build_model(cfg, (3, 32, 32), 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == math.ceil(m.num_channels / 32) for m in norms)
    assert model.bn1.num_groups == 2  # the stem's 64 channels
    drops2d = [m for m in model.modules() if isinstance(m, nn.Dropout2d)]
    assert len(drops2d) == 4 and all(m.p == 0.1 for m in drops2d)
    assert isinstance(model.fc[0], nn.Dropout) and model.fc[0].p == 0.3
    assert isinstance(model.fc[1], nn.Linear) and model.fc[1].out_features == 10


def test_resnet50_bad_group_channels():
    with pytest.raises(ConfigError, match="--model.group_channels 48"):
        build_model(ModelConfig(name="resnet50", group_channels=48), (3, 32, 32), 10)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet50"])
def test_seeding(name):
    def weights(seed: int) -> torch.Tensor:
        model = build_model(ModelConfig(name=name, model_seed=seed), (1, 8, 8), 10)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(weights(0), weights(0))
    assert not torch.equal(weights(0), weights(1))


def test_build_leaves_caller_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    build_model(ModelConfig(name="cnn"), (3, 32, 32), 10)
    assert torch.equal(torch.rand(5), expected)


def test_unknown_model():
    with pytest.raises(ConfigError, match="--model.name"):
        build_model(ModelConfig(name="vgg"), (3, 32, 32), 10)
