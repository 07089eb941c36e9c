"""trlib.models: shapes on real and stand-in inputs, parameter counts computed here from
the architecture formulas, gradients and Hessian-vector products through every network."""

import pytest
import torch
from torch import nn

import trlib.models as models
from trlib.data import DATASETS
from trlib.models import TASKS, build_model, count_parameters

REAL_SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
DIGITS, MNIST1D = (1, 8, 8), (40,)
IMAGE_ONLY = {"mnist_conv", "cifar_conv", "cifar_resnet18", "cifar_resnet20"}


def linear(i, o):
    return i * o + o


def conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c


def resnet_count(widths, blocks, in_channels=3, classes=10):
    total = conv(in_channels, widths[0], 3, bias=False) + bn(widths[0])
    cin = widths[0]
    for stage, (c, n) in enumerate(zip(widths, blocks)):
        for j in range(n):
            total += conv(cin, c, 3, False) + bn(c) + conv(c, c, 3, False) + bn(c)
            if cin != c or (stage > 0 and j == 0):  # projection shortcut (option B)
                total += conv(cin, c, 1, False) + bn(c)
            cin = c
    return total + linear(cin, classes)


def shapes_for(task):
    shapes = [REAL_SHAPES[TASKS[task].dataset], DIGITS]
    if task not in IMAGE_ONLY:
        shapes.append(MNIST1D)
    return shapes


def test_task_table_is_consistent():
    assert set(TASKS) == {"mnist_mlp", "fashion_mnist_mlp", "cifar_mlp", "mnist_conv", "cifar_conv",
                          "mnist_autoencoder", "fashion_mnist_autoencoder",
                          "cifar_resnet18", "cifar_resnet20"}
    for name, task in TASKS.items():
        assert task.dataset in DATASETS and task.loss in {"classification", "reconstruction"}
        assert (task.loss == "reconstruction") == ("autoencoder" in name)


@pytest.mark.parametrize("task", list(TASKS))
def test_output_shapes_on_real_and_stand_in_inputs(task):
    torch.manual_seed(0)
    for shape in shapes_for(task):
        net = build_model(task, shape).eval()
        x = torch.rand(2, *shape)
        with torch.no_grad():
            out = net(x)
        if TASKS[task].loss == "classification":
            assert out.shape == (2, 10), (task, shape)
        else:
            assert out.shape == x.shape, (task, shape)
            assert out.min().item() > 0 and out.max().item() < 1


@pytest.mark.parametrize("task", sorted(IMAGE_ONLY))
def test_image_tasks_reject_flat_inputs(task):
    with pytest.raises(ValueError, match="image"):
        build_model(task, MNIST1D)


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        build_model("imagenet_vit")
    for name in TASKS:
        assert name in str(info.value)


def test_mnist_mlp_parameter_count():
    net = build_model("mnist_mlp")
    assert count_parameters(net) == 784 * 128 + 128 + 128 * 10 + 10 == 101_770
    assert isinstance(net[0], nn.Flatten) and isinstance(net[2], nn.Tanh)
    assert count_parameters(build_model("fashion_mnist_mlp")) == 101_770


def test_cifar_mlp_parameter_count():
    expected = linear(3072, 128) + linear(128, 128) + linear(128, 10)
    assert count_parameters(build_model("cifar_mlp")) == expected == 411_146


def test_stand_in_sizes_follow_the_input_shape():
    assert count_parameters(build_model("mnist_mlp", DIGITS)) == linear(64, 128) + linear(128, 10)
    assert count_parameters(build_model("mnist_mlp", MNIST1D, 3)) == linear(40, 128) + linear(128, 3)
    from trlib.data import load_dataset

    digits = load_dataset("digits", train=False)
    net = build_model("mnist_mlp", dataset=digits)
    assert net[1].in_features == 64 and net(digits.x[:4]).shape == (4, 10)


def test_mnist_conv_sizes():
    # 28 -> conv5 24 -> pool 12 -> conv5 8 -> pool 4: fc 50*4*4 = 800 -> 500 -> 10 (LeNet in Caffe).
    expected = conv(1, 20, 5) + conv(20, 50, 5) + linear(800, 500) + linear(500, 10)
    net = build_model("mnist_conv")
    assert count_parameters(net) == expected == 431_080
    fcs = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in fcs] == [(800, 500), (500, 10)]
    assert not any(isinstance(m, (nn.Tanh, nn.Softplus)) for m in net.modules())
    # 8x8 digits: padded convolutions, 8 -> 8 -> 4 -> 4 -> 2, so fc 50*2*2 = 200.
    small = build_model("mnist_conv", DIGITS)
    assert [m for m in small.modules() if isinstance(m, nn.Linear)][0].in_features == 200
    with pytest.raises(ValueError, match="too small"):
        models.mnist_conv(image_size=3)


def test_cifar_conv_is_lenet_with_softplus():
    expected = conv(3, 6, 5) + conv(6, 16, 5) + linear(400, 120) + linear(120, 84) + linear(84, 10)
    net = build_model("cifar_conv")
    assert count_parameters(net) == expected == 62_006
    assert sum(isinstance(m, nn.Softplus) for m in net.modules()) == 4
    assert not any(isinstance(m, nn.ReLU) for m in net.modules())
    assert models.cifar_conv(image_size=(32, 24))(torch.rand(1, 3, 32, 24)).shape == (1, 10)


def test_autoencoder_architecture():
    net = build_model("mnist_autoencoder")
    sizes = [784, 1000, 500, 250, 30]
    expected = sum(linear(a, b) for a, b in zip(sizes, sizes[1:]))
    expected += sum(linear(b, a) for a, b in zip(sizes, sizes[1:]))
    assert count_parameters(net) == expected == 2_837_314
    enc = [m for m in net.encoder if isinstance(m, nn.Linear)]
    dec = [m for m in net.decoder if isinstance(m, nn.Linear)]
    assert [m.out_features for m in enc] == sizes[1:]
    assert [m.out_features for m in dec] == sizes[::-1][1:]
    assert isinstance(net.encoder[-1], nn.Linear)  # linear code layer
    assert isinstance(models.autoencoder(code_activation="sigmoid").encoder[-1], nn.Sigmoid)
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        out = net(x)
        code = net.encoder(x)
    assert out.shape == x.shape and code.shape == (3, 30)
    assert (out > 0).all() and (out < 1).all()


def test_resnet18_cifar_parameter_count_and_stem():
    net = build_model("cifar_resnet18")
    expected = resnet_count((64, 128, 256, 512), (2, 2, 2, 2))
    assert count_parameters(net) == expected
    assert expected == 11_173_962  # the published figure for the CIFAR ResNet-18
    stem = [m for m in net.modules() if isinstance(m, nn.Conv2d)][0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 20


def test_resnet20_parameter_count():
    net = build_model("cifar_resnet20")
    expected = resnet_count((16, 32, 64), (3, 3, 3))
    assert count_parameters(net) == expected == 272_474
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in net.modules()) == 19
    assert count_parameters(models.resnet20(width=8, num_classes=5, in_channels=1)) == \
        resnet_count((8, 16, 32), (3, 3, 3), in_channels=1, classes=5)


@pytest.mark.parametrize("task,final", [("cifar_resnet18", (512, 4, 4)), ("cifar_resnet20", (64, 8, 8))])
def test_resnets_downsample_once_per_later_stage(task, final):
    # CIFAR stem keeps 32x32; each stage after the first halves the size.
    net = build_model(task).eval()
    seen = []
    net.pool.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    with torch.no_grad():
        net(torch.rand(1, 3, 32, 32))
    assert tuple(seen[0][1:]) == final


def loss_of(task, net, x, y):
    out = net(x)
    if TASKS[task].loss == "classification":
        return nn.functional.cross_entropy(out, y)
    return nn.functional.mse_loss(out, x)


@pytest.mark.parametrize("task", list(TASKS))
def test_gradients_reach_every_parameter(task):
    torch.manual_seed(0)
    shape = REAL_SHAPES[TASKS[task].dataset]
    net = build_model(task, shape)
    x, y = torch.rand(2, *shape), torch.tensor([1, 7])
    loss_of(task, net, x, y).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum().item() > 0, name


# ResNet-18 is left out to keep the file fast: it is built from the same ResNet/BasicBlock
# code as ResNet-20, with 40 times the parameters.
@pytest.mark.parametrize("task", [t for t in TASKS if t != "cifar_resnet18"])
def test_hessian_vector_product_by_double_backward(task):
    # On the small digits shape: second-order methods differentiate each network twice.
    torch.manual_seed(0)
    net = build_model(task, DIGITS)
    params = [p for p in net.parameters()]
    x, y = torch.rand(4, *DIGITS), torch.tensor([0, 3, 5, 9])
    grads = torch.autograd.grad(loss_of(task, net, x, y), params, create_graph=True)
    vs = [torch.randn_like(p) for p in params]
    hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), params, allow_unused=True)
    assert all(h is not None and torch.isfinite(h).all() for h in hv)
    assert sum(h.abs().sum().item() for h in hv) > 0


def test_mlp_validates_activation_and_accepts_module_class():
    with pytest.raises(ValueError, match="activation"):
        models.mlp(10, activation="swishy")
    net = models.mlp(10, (5, 5), 3, activation=nn.ReLU)
    assert sum(isinstance(m, nn.ReLU) for m in net) == 2 and net(torch.rand(2, 10)).shape == (2, 3)
