"""Model shapes, exact parameter counts (arithmetic written out) and the registry."""
from __future__ import annotations

import pytest
import torch

from prunekit.core.errors import UnknownNameError
from prunekit.models import get_model, list_models, register_model


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_lenet5_caffe_count_and_shape():
    m = get_model("lenet5")
    expected = (20 * 25 + 20) + (50 * 20 * 25 + 50) + (800 * 500 + 500) + (500 * 10 + 10)
    assert expected == 431080 and n_params(m) == expected
    assert m(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert [n for n, _ in m.named_parameters()] == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                                                    "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_lenet5_classic_count_and_shape():
    m = get_model("lenet5_classic", num_classes=7)
    expected = (6 * 25 + 6) + (16 * 6 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 7 + 7)
    assert n_params(m) == expected
    assert n_params(get_model("lenet5_classic")) == 61706
    assert m(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_resnet18_cifar_count_and_shape():
    m = get_model("resnet18_cifar")
    stem = 3 * 64 * 9 + 2 * 64                                          # conv + BN
    def stage(cin, c):                                                  # 2 BasicBlocks, BN = 2c each
        first = cin * c * 9 + c * c * 9 + 2 * (2 * c)
        down = (cin * c + 2 * c) if cin != c else 0                     # option-B 1x1 conv + BN
        return first + down + 2 * (c * c * 9) + 2 * (2 * c)
    fc = 512 * 10 + 10
    expected = stem + stage(64, 64) + stage(64, 128) + stage(128, 256) + stage(256, 512) + fc
    assert expected == 11173962 and n_params(m) == expected
    m.eval()
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    names = dict(m.named_modules())
    assert "layer2.0.downsample.0" in names and "layer1.0.downsample" not in names and "maxpool" not in names
    assert names["conv1"].kernel_size == (3, 3) and names["conv1"].stride == (1, 1)


def test_registry():
    assert list_models() == ["lenet5", "lenet5_classic", "resnet18_cifar"]
    assert list_models("lenet*") == ["lenet5", "lenet5_classic"]
    assert list_models("*vit*") == []
    with pytest.raises(UnknownNameError, match="unknown model .vgg16.; valid: lenet5, lenet5_classic, resnet18_cifar"):
        get_model("vgg16")
    assert get_model("resnet18_cifar", num_classes=100).fc.out_features == 100
    with pytest.raises(ValueError, match="already registered"):
        register_model("lenet5", lambda **kw: torch.nn.Linear(1, 1))
