"""Models used by the benchmarks: LeNet-5 (two variants) and the CIFAR ResNet-18, plus a registry."""
from prunekit.models.lenet import LeNet5, LeNet5Classic, lenet5, lenet5_classic
from prunekit.models.registry import get_model, list_models, register_model
from prunekit.models.resnet import BasicBlock, ResNetCIFAR, resnet18_cifar

__all__ = ["LeNet5", "LeNet5Classic", "lenet5", "lenet5_classic", "BasicBlock", "ResNetCIFAR",
           "resnet18_cifar", "get_model", "list_models", "register_model"]
