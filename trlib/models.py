"""The paper's networks, and one table of the training tasks that use them.

Every constructor takes its input size as arguments, so the same task runs on the real
dataset and on an offline stand-in (``mnist_mlp`` on 8x8 digits gets ``in_features=64``).
No module uses in-place operations, so double backward and ``torch.func`` transforms
(Hessian-vector products) work on all of them.

Example:
    >>> import torch
    >>> from trlib.models import build_model, count_parameters
    >>> net = build_model("mnist_mlp")
    >>> count_parameters(net)
    101770
    >>> small = build_model("mnist_conv", input_shape=(1, 8, 8))  # on the digits stand-in
    >>> tuple(small(torch.rand(5, 1, 8, 8)).shape)
    (5, 10)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .data import dataset_info

__all__ = ["TASKS", "Task", "autoencoder", "build_model", "cifar_conv", "count_parameters", "get_task", "mlp",
           "mnist_conv", "resnet18_cifar", "resnet20"]

_ACTIVATIONS = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus, "elu": nn.ELU, "gelu": nn.GELU,
}

ImageSize = Union[int, Tuple[int, int]]


def _activation(activation) -> nn.Module:
    if isinstance(activation, str):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(_ACTIVATIONS)}")
        return _ACTIVATIONS[activation]()
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        return activation()
    raise ValueError(f"activation must be a name or an nn.Module class, got {activation!r}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def mlp(
    in_features: int,
    hidden: Sequence[int] = (128,),
    out_features: int = 10,
    activation="tanh",
) -> nn.Sequential:
    """Fully connected net ``Flatten -> [Linear -> activation]* -> Linear``.

    The paper's MNIST/Fashion-MNIST MLP is ``mlp(784)`` (784-128-10, tanh; 101,770
    parameters); its CIFAR-10 MLP is ``mlp(3072, (128, 128))`` (411,146 parameters).

    >>> mlp(64, (32,))(torch.rand(3, 1, 8, 8)).shape
    torch.Size([3, 10])
    """
    sizes = [in_features, *hidden, out_features]
    layers = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(_activation(activation))
    return nn.Sequential(*layers)


def _lenet_features(image_size: ImageSize, kernel: int = 5) -> Tuple[int, Tuple[int, int]]:
    """Padding and output size of two ``conv(kernel) -> maxpool(2)`` blocks.

    Unpadded convolutions (the original LeNet) when the image is big enough, e.g. 28 -> 24
    -> 12 -> 8 -> 4; otherwise "same" padding, so 8x8 digits give 8 -> 4 -> 2.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    for pad in (0, kernel // 2):
        block = lambda s: (s + 2 * pad - kernel + 1) // 2  # noqa: E731
        out = (block(block(h)), block(block(w)))
        if min(out) >= 1:
            return pad, out
    raise ValueError(f"image_size {image_size} is too small for two 5x5 conv + 2x2 pool blocks (need >= 4)")


def mnist_conv(in_channels: int = 1, num_classes: int = 10, image_size: ImageSize = 28) -> nn.Sequential:
    """The paper's MNIST convnet (LeNet-5 as in Caffe, with ReLU):
    conv 20 5x5 -> ReLU -> max-pool 2 -> conv 50 5x5 -> ReLU -> max-pool 2 -> fc 500 -> ReLU -> fc.

    At 28x28 the convolutions are unpadded and the flattened size is 50*4*4 = 800
    (431,080 parameters). Images smaller than 16 pixels use padding 2 instead (see
    ``_lenet_features``): 8x8 digits flatten to 50*2*2 = 200.
    """
    pad, (h, w) = _lenet_features(image_size)
    return nn.Sequential(
        nn.Conv2d(in_channels, 20, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5, padding=pad), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * h * w, 500), nn.ReLU(),
        nn.Linear(500, num_classes),
    )


def cifar_conv(in_channels: int = 3, num_classes: int = 10, image_size: ImageSize = 32) -> nn.Sequential:
    """The paper's LeNet-like CIFAR-10 convnet with Softplus activations:
    conv 6 5x5 -> max-pool 2 -> conv 16 5x5 -> max-pool 2 -> fc 120 -> fc 84 -> fc.

    At 32x32 the flattened size is 16*5*5 = 400 (62,006 parameters). Small images are padded
    as in :func:`mnist_conv`. Softplus keeps the network twice differentiable everywhere,
    which suits Hessian-based methods.
    """
    pad, (h, w) = _lenet_features(image_size)
    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=pad), nn.Softplus(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=pad), nn.Softplus(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * h * w, 120), nn.Softplus(),
        nn.Linear(120, 84), nn.Softplus(),
        nn.Linear(84, num_classes),
    )


def autoencoder(
    in_features: int = 784,
    code: int = 30,
    hidden: Sequence[int] = (1000, 500, 250),
    *,
    code_activation: Optional[str] = None,
    output_shape: Optional[Sequence[int]] = None,
) -> nn.Sequential:
    """The deep autoencoder of Hinton & Salakhutdinov (2006), a standard second-order
    benchmark: 784-1000-500-250-30 and mirrored, sigmoid hidden units, sigmoid output
    (so inputs and targets must lie in [0, 1]).

    As in that benchmark, the 30-unit code layer is linear by default
    (``code_activation="sigmoid"`` makes it logistic too). The default has 2,837,314
    parameters. The input is flattened; with ``output_shape`` (e.g. ``(1, 28, 28)``) the
    reconstruction is reshaped so that ``loss(model(x), x)`` needs no reshaping.
    The halves are ``model.encoder`` and ``model.decoder``.
    """
    sizes = [in_features, *hidden, code]
    enc = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        enc.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            enc.append(nn.Sigmoid())
        elif code_activation is not None:
            enc.append(_activation(code_activation))
    rev = sizes[::-1]
    dec = []
    for a, b in zip(rev[:-1], rev[1:]):
        dec += [nn.Linear(a, b), nn.Sigmoid()]
    if output_shape is not None:
        dec.append(nn.Unflatten(1, tuple(output_shape)))
    return nn.Sequential(OrderedDict(encoder=nn.Sequential(*enc), decoder=nn.Sequential(*dec)))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut, or a 1x1 conv-BN projection when
    the shape changes (He et al. 2016, option B)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Out-of-place ops throughout: in-place ReLU/add break some double-backward paths.
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem (stride 1, no max-pool), stages of :class:`BasicBlock`,
    global average pooling, linear classifier. Any image size >= 1 pixel per stage works."""

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]), nn.ReLU(),
        )
        stages, c = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(c, width, stride=2 if (i > 0 and j == 0) else 1))
                c = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18 for 32x32 inputs (stages of 2 blocks, 64/128/256/512 channels, projection
    shortcuts): 11,173,962 parameters for 10 classes."""
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels)


def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> ResNet:
    """He et al.'s CIFAR ResNet-20: 3 stages x 3 blocks with width/2*width/4*width channels.

    Shortcuts that change shape use a 1x1 conv + BN projection (option B) rather than the
    paper's zero-padded identity (option A): it is a plain module that every curvature tool
    handles, at the cost of 2,752 extra parameters (272,474 in all at width 16, vs 269,722).
    """
    return ResNet((width, 2 * width, 4 * width), (3, 3, 3), num_classes, in_channels)


# --- the task table ---

@dataclass(frozen=True)
class Task:
    """A training problem of the paper: which dataset, which loss, which network.

    ``build(input_shape, num_classes)`` makes the network for a dataset of that shape, so
    the task also runs on a stand-in. ``loss`` is ``"classification"`` (cross-entropy on
    logits) or ``"reconstruction"`` (the network reproduces its input, shaped like it).
    """

    dataset: str
    loss: str
    build: Callable[[tuple, int], nn.Module]
    description: str


def _on_images(make):
    """A ``Task.build`` for a convnet ``make(channels, num_classes, (H, W))``."""
    def build(shape, num_classes):
        if len(shape) != 3:
            raise ValueError(f"this task needs image inputs (C, H, W), got input_shape={tuple(shape)}")
        return make(shape[0], num_classes, tuple(shape[1:]))
    return build


def _mlp(hidden):
    return lambda shape, num_classes: mlp(math.prod(shape), hidden, num_classes)


def _autoencoder(shape, num_classes):
    return autoencoder(math.prod(shape), output_shape=shape)


_AE = "autoencoder 784-1000-500-250-30, mirrored, sigmoid"

#: Every task of the paper: name -> Task(dataset, loss kind, network builder, description).
TASKS = {
    "mnist_mlp": Task("mnist", "classification", _mlp((128,)), "MLP 784-128-10, tanh"),
    "fashion_mnist_mlp": Task("fashion_mnist", "classification", _mlp((128,)), "MLP 784-128-10, tanh"),
    "cifar_mlp": Task("cifar10", "classification", _mlp((128, 128)), "MLP 3072-128-128-10, tanh"),
    "mnist_conv": Task("mnist", "classification", _on_images(mnist_conv),
                       "LeNet conv20-conv50-fc500, ReLU"),
    "cifar_conv": Task("cifar10", "classification", _on_images(cifar_conv),
                       "LeNet-like conv6-conv16-fc120-fc84, Softplus"),
    "mnist_autoencoder": Task("mnist", "reconstruction", _autoencoder, _AE),
    "fashion_mnist_autoencoder": Task("fashion_mnist", "reconstruction", _autoencoder, _AE),
    "cifar_resnet18": Task("cifar10", "classification",
                           _on_images(lambda c, k, hw: resnet18_cifar(k, c)), "ResNet-18, CIFAR stem"),
    "cifar_resnet20": Task("cifar10", "classification",
                           _on_images(lambda c, k, hw: resnet20(k, c)),
                           "ResNet-20 (He et al.), projection shortcuts"),
}


def get_task(name: str) -> Task:
    """The :data:`TASKS` entry for ``name``; ValueError listing the valid names otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def build_model(
    task: str,
    input_shape: Optional[Sequence[int]] = None,
    num_classes: Optional[int] = None,
    *,
    dataset=None,
) -> nn.Module:
    """The network of ``task`` for a given input shape (per sample) and class count.

    Shape and classes come from, in order: the arguments, ``dataset`` (a
    :class:`trlib.data.Dataset`, e.g. a stand-in), the task's own dataset.

    >>> build_model("mnist_mlp", (1, 8, 8))[1]  # on sklearn digits
    Linear(in_features=64, out_features=128, bias=True)
    """
    t = get_task(task)
    info = dataset_info(t.dataset)
    if input_shape is None:
        input_shape = dataset.input_shape if dataset is not None else info.input_shape
    if num_classes is None:
        num_classes = dataset.num_classes if dataset is not None else info.num_classes
    return t.build(tuple(int(d) for d in input_shape), int(num_classes))
