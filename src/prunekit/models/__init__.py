"""Models used by the benchmarks: LeNet-5 (two variants) and the CIFAR ResNet-18, plus a registry."""
from .lenet import LeNet5, LeNet5Classic, lenet5, lenet5_classic
from .registry import get_model, list_models, register_model
from .resnet import BasicBlock, ResNetCIFAR, resnet18_cifar

__all__ = ["LeNet5", "LeNet5Classic", "lenet5", "lenet5_classic", "BasicBlock", "ResNetCIFAR",
           "resnet18_cifar", "get_model", "list_models", "register_model"]
