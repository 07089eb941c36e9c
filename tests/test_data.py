"""trlib.data: the IDX reader and the torchvision loading code on small files fabricated in the
real on-disk formats, where copies are found, the real Fashion-MNIST where it is installed, the
offline stand-ins, and mini-batching."""

import gzip
import os
import pickle
import random
import struct
from pathlib import Path
import urllib.error
import urllib.request

import dataclasses

import numpy as np
import pytest
import torch
import torchvision.datasets

import trlib.data as data
from trlib.data import DatasetUnavailableError, batches, load_dataset, load_dataset_or_stand_in


# --- fabricated files -------------------------------------------------------------------

def write_idx(path, array):
    """IDX format as on yann.lecun.com: magic 0x0000 08 ndim, big-endian uint32 dims, bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def write_idx_gz(path, array):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def fabricate_idx_copy(folder, n_train=12, n_test=7, seed=0, compress=False):
    """The four files of an MNIST-format dataset in `folder`, as published (.gz) or gunzipped."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255  # both ends of the range present
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        for stem, array in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
            if compress:
                write_idx_gz(folder / f"{stem}.gz", array)
            else:
                write_idx(folder / stem, array)
        out[split] = (images, labels)
    return out


def fabricate_mnist(root, folder, n_train=12, n_test=7, seed=0, compress=False):
    """A copy in torchvision's layout, <root>/<folder>/raw/."""
    return fabricate_idx_copy(root / folder / "raw", n_train, n_test, seed, compress)


@pytest.fixture(autouse=True)
def no_data_outside_the_test(request, monkeypatch, tmp_path_factory):
    """No test sees this machine's copies ($TRLIB_DATA, ~/.cache, /usr/share/datasets) unless
    it asks for them with the `installed_data` marker: HOME is an empty folder and the
    system-wide folders are hidden."""
    if request.node.get_closest_marker("installed_data"):
        return
    monkeypatch.delenv("TRLIB_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    for key, spec in list(data._DATASETS.items()):
        monkeypatch.setitem(data._DATASETS, key, dataclasses.replace(spec, system_dirs=()))


def expected_x(images):
    return torch.from_numpy(images.astype(np.float32) / np.float32(255.0)).unsqueeze(1)


def fabricate_cifar10(root, per_batch=3, n_test=4, seed=0):
    """Python-pickle batches as in cifar-10-python.tar.gz: rows of 3072 bytes, the red plane
    then green then blue, each row-major 32x32."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    out = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        entry = {"batch_label": name, "labels": labels, "data": rows,
                 "filenames": [f"img_{name}_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
        out[name] = (rows, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                     "frog", "horse", "ship", "truck"],
                     "num_cases_per_batch": per_batch, "num_vis": 3072}, f)
    return out


@pytest.fixture
def no_cifar_checksums(monkeypatch):
    """torchvision md5-checks the real CIFAR files; fabricated ones need no checksum."""
    cls = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cls, "train_list", [[name, None] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, None] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": None})


@pytest.fixture
def offline(monkeypatch):
    """Every URL open fails as it does without a network; records the attempts."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[0])
        raise urllib.error.URLError("network unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return attempts


# --- torchvision datasets on fabricated files ---------------------------------------------

@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
@pytest.mark.parametrize("train", [True, False])
def test_mnist_format_loads_exact_values(tmp_path, offline, name, folder, train):
    truth = fabricate_mnist(tmp_path, folder)
    images, labels = truth["train" if train else "t10k"]
    ds = load_dataset(name, root=tmp_path, train=train)  # download=None: files exist, no network
    assert offline == []
    assert ds.x.shape == (len(labels), 1, 28, 28) and ds.x.dtype == torch.float32
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == labels.tolist()
    expected = torch.from_numpy(images.astype(np.float32) / np.float32(255.0)).unsqueeze(1)
    assert torch.equal(ds.x, expected)
    assert ds.x.min().item() == 0.0 and ds.x.max().item() == 1.0  # left in [0, 1] by default
    assert ds.name == name and not ds.is_stand_in and ds.stand_in_for is None
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10 and len(ds) == len(labels)


def test_mnist_flatten_and_normalize(tmp_path):
    images, _ = fabricate_mnist(tmp_path, "MNIST")["train"]
    ds = load_dataset("mnist", root=tmp_path, download=False, flatten=True, normalize=True)
    assert ds.x.shape == (len(images), 784) and ds.input_shape == (784,)
    expected = (images.reshape(len(images), -1).astype(np.float64) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(ds.x.numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("train", [True, False])
def test_cifar10_pickles_load_exact_values(tmp_path, offline, no_cifar_checksums, train):
    truth = fabricate_cifar10(tmp_path)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    rows = np.concatenate([truth[n][0] for n in names])
    labels = sum((truth[n][1] for n in names), [])

    raw = load_dataset("cifar10", root=tmp_path, train=train, normalize=False)
    assert offline == []
    assert raw.x.shape == (len(labels), 3, 32, 32) and raw.x.dtype == torch.float32
    assert raw.y.dtype == torch.int64 and raw.y.tolist() == labels
    planes = rows.reshape(-1, 3, 32, 32).astype(np.float32) / np.float32(255.0)
    assert torch.equal(raw.x, torch.from_numpy(planes))
    assert 0.0 <= raw.x.min().item() and raw.x.max().item() <= 1.0

    # Default: standardised per channel with the published CIFAR-10 training statistics.
    ds = load_dataset("cifar10", root=tmp_path, train=train)
    mean = np.array([0.4914, 0.4822, 0.4465]).reshape(1, 3, 1, 1)
    std = np.array([0.2470, 0.2435, 0.2616]).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(ds.x.numpy(), (rows.reshape(-1, 3, 32, 32) / 255 - mean) / std, atol=1e-5)
    assert ds.y.tolist() == labels


def test_cifar10_normalised_mean_near_zero_on_cifar_like_pixels(tmp_path, no_cifar_checksums):
    # Pixels spread around the real per-channel means give standardised means near 0.
    fabricate_cifar10(tmp_path, per_batch=50, n_test=2)
    folder = tmp_path / "cifar-10-batches-py"
    rng = np.random.default_rng(1)
    mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "rb") as f:
            entry = pickle.load(f)
        planes = rng.normal(mean[None, :, None], std[None, :, None] / 2, size=(50, 3, 1024))
        entry["data"] = np.clip(np.round(planes * 255), 0, 255).astype(np.uint8).reshape(50, 3072)
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(entry, f)
    ds = load_dataset("cifar10", root=tmp_path, download=False)
    channel_means = ds.x.mean(dim=(0, 2, 3))
    assert channel_means.abs().max().item() < 0.02


# --- missing datasets ------------------------------------------------------------------------

@pytest.mark.parametrize("name,where", [("mnist", "MNIST/raw"), ("fashion_mnist", "FashionMNIST/raw"),
                                       ("cifar10", "cifar-10-batches-py")])
def test_missing_with_download_disabled(tmp_path, offline, name, where):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset(name, root=tmp_path, download=False)
    msg = str(info.value)
    assert offline == []  # download=False never touches the network
    assert isinstance(info.value, RuntimeError)
    assert data.dataset_info(name).display_name in msg and repr(name) in msg
    assert str(tmp_path / where) in msg
    assert "download=True" in msg and "digits" in msg and "load_dataset_or_stand_in" in msg


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_and_offline_raises_clear_error_chained(tmp_path, offline, name):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset(name, root=tmp_path)  # download=None: tries, and the download fails
    assert offline, "a download must actually have been attempted"
    msg = str(info.value)
    assert "download failed" in msg and "network unreachable (test)" in msg
    assert str(tmp_path) in msg and "mnist1d" in msg
    assert info.value.__cause__ is not None  # the torchvision error is chained, not shown


def test_mnist_copy_instructions_name_the_files(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("mnist", root=tmp_path, download=False)
    for f in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert f in str(info.value)


def test_default_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("TRLIB_DATA", str(tmp_path / "elsewhere"))
    assert data.default_root() == tmp_path / "elsewhere"
    with pytest.raises(DatasetUnavailableError, match="elsewhere"):
        load_dataset("mnist", download=False)
    monkeypatch.delenv("TRLIB_DATA")
    assert data.default_root().parts[-3:] == (".cache", "trlib", "data")


# --- IDX files and where copies are found ---------------------------------------------------

@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_idx_copy_loads_exact_values_gzip_or_not(tmp_path, offline, name, folder, compress):
    truth = fabricate_mnist(tmp_path, folder, compress=compress, seed=3)
    for train, split in ((True, "train"), (False, "t10k")):
        images, labels = truth[split]
        ds = load_dataset(name, root=tmp_path, train=train)
        assert torch.equal(ds.x, expected_x(images)) and ds.y.tolist() == labels.tolist()
        assert ds.source == str(tmp_path / folder / "raw")
    assert offline == []  # a local copy is never checked against the network


def test_read_idx_reads_any_element_type_and_detects_gzip_by_content(tmp_path):
    values = np.arange(-6, 6, dtype=">i4").reshape(3, 4)
    header = struct.pack(">BBBB", 0, 0, 0x0C, 2) + struct.pack(">2I", 3, 4)
    (tmp_path / "a").write_bytes(header + values.tobytes())
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a"), values)
    with gzip.open(tmp_path / "b.idx", "wb") as f:  # compressed, without a .gz name
        f.write(header + values.tobytes())
    np.testing.assert_array_equal(data.read_idx(tmp_path / "b.idx"), values)


def damaged(tmp_path, kind):
    folder = tmp_path / "FashionMNIST" / "raw"
    fabricate_idx_copy(folder, compress=True)
    path = folder / "train-images-idx3-ubyte.gz"
    images = np.zeros((12, 28, 28), np.uint8)
    if kind == "truncated gzip":
        path.write_bytes(path.read_bytes()[:-30])
    elif kind == "not idx":
        with gzip.open(path, "wb") as f:
            f.write(b"<html>404</html>" * 10)
    elif kind == "short data":
        header = struct.pack(">BBBB", 0, 0, 0x08, 3) + struct.pack(">3I", 12, 28, 28)
        with gzip.open(path, "wb") as f:
            f.write(header + images.tobytes()[:-1])
    elif kind == "wrong shape":
        write_idx_gz(path, np.zeros((12, 8, 8), np.uint8))
    elif kind == "label count":
        write_idx_gz(path, np.zeros((11, 28, 28), np.uint8))
    elif kind == "label range":
        write_idx_gz(folder / "train-labels-idx1-ubyte.gz", np.full(12, 10, np.uint8))
        return folder / "train-labels-idx1-ubyte.gz"
    return path


@pytest.mark.parametrize("kind,message", [
    ("truncated gzip", "not a readable gzip file"), ("not idx", "not an IDX file"),
    ("short data", "truncated or damaged"), ("wrong shape", "expected uint8 images of shape"),
    ("label count", "labels"), ("label range", "outside 0..9")])
def test_damaged_local_copy_is_a_clear_error_naming_the_file(tmp_path, offline, kind, message):
    path = damaged(tmp_path, kind)
    with pytest.raises(ValueError, match=message) as info:
        load_dataset("fashion_mnist", root=tmp_path)
    assert str(path.parent) in str(info.value) and offline == []


def test_copies_are_searched_in_order(tmp_path, monkeypatch):
    system = tmp_path / "usr" / "share" / "datasets" / "fashion-mnist"
    spec = data._DATASETS["fashion_mnist"]
    monkeypatch.setitem(data._DATASETS, "fashion_mnist", dataclasses.replace(spec, system_dirs=(str(system),)))
    env, home = tmp_path / "env", tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("TRLIB_DATA", str(env))
    copies = {
        "env": fabricate_mnist(env, "FashionMNIST", seed=1, compress=True),
        "cache": fabricate_mnist(home / ".cache" / "trlib" / "data", "FashionMNIST", seed=2),
        "system": fabricate_idx_copy(system, seed=4, compress=True),  # the flat layout of the package
    }
    places = {"env": env / "FashionMNIST" / "raw", "cache": home / ".cache" / "trlib" / "data" / "FashionMNIST" / "raw",
              "system": system}
    assert data.search_path("fashion_mnist") == [places["env"], places["cache"], places["system"]]
    assert data.search_path("mnist") == [env / "MNIST" / "raw", places["cache"].parent.parent / "MNIST" / "raw"]

    def loaded():
        ds = load_dataset("fashion_mnist", download=False)
        which = [k for k, (images, _) in ((k, c["train"]) for k, c in copies.items())
                 if images.shape[0] == len(ds) and torch.equal(ds.x, expected_x(images))]
        assert len(which) == 1 and ds.source == str(places[which[0]])
        return which[0]

    assert loaded() == "env"
    monkeypatch.delenv("TRLIB_DATA")
    assert loaded() == "cache"
    for f in places["cache"].iterdir():  # an incomplete copy is skipped
        if f.name.startswith("t10k-labels"):
            f.unlink()
    assert loaded() == "system"
    # an explicit root comes first, then the system-wide copy
    fabricate_mnist(tmp_path / "mine", "FashionMNIST", seed=5)
    assert load_dataset("fashion_mnist", root=tmp_path / "mine").source == str(tmp_path / "mine" / "FashionMNIST" / "raw")
    assert load_dataset("fashion_mnist", root=tmp_path / "empty").source == str(system)


def test_missing_message_lists_every_folder_searched_and_the_package(tmp_path, monkeypatch):
    spec = data._DATASETS["fashion_mnist"]
    monkeypatch.setitem(data._DATASETS, "fashion_mnist",
                        dataclasses.replace(spec, system_dirs=(str(tmp_path / "system"),)))
    monkeypatch.setenv("TRLIB_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("fashion_mnist", download=False)
    msg = str(info.value)
    for folder in data.search_path("fashion_mnist"):
        assert str(folder) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "train-images-idx3-ubyte.gz" in msg


def test_runner_with_data_auto_records_the_real_dataset(tmp_path, monkeypatch, offline):
    from trlib.experiments import run

    monkeypatch.setenv("TRLIB_DATA", str(tmp_path))
    fabricate_mnist(tmp_path, "FashionMNIST", n_train=40, n_test=10, compress=True)
    log = run("fashion_mnist_mlp", "sgd", 0, "2backprops", data="auto", progress=False, verbose=False)
    assert log and all(r["stand_in"] is False and r["dataset"] == "Fashion-MNIST" for r in log)
    assert offline == []


REAL = Path("/usr/share/datasets/fashion-mnist")
REAL_FILES = [REAL / f"{stem}.gz" for stem in data.dataset_info("fashion_mnist").files]


@pytest.mark.installed_data
@pytest.mark.skipif(not all(f.is_file() for f in REAL_FILES),
                    reason="the real Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_is_found_without_configuration(monkeypatch, tmp_path, offline):
    from trlib.experiments import run

    monkeypatch.delenv("TRLIB_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no cache: the system-wide copy is the one found
    train, test = load_dataset("fashion_mnist"), load_dataset("fashion_mnist", train=False)
    assert (len(train), len(test)) == (60000, 10000) and train.source == test.source == str(REAL)
    assert train.x.shape == (60000, 1, 28, 28) and not train.is_stand_in
    # the published facts: 6,000 training and 1,000 test images per class, pixel mean 0.2860
    assert torch.bincount(train.y).tolist() == [6000] * 10 and torch.bincount(test.y).tolist() == [1000] * 10
    assert train.x.min().item() == 0.0 and train.x.max().item() == 1.0
    assert abs(train.x.mean().item() - 0.2860) < 5e-4
    log = run("fashion_mnist_mlp", "sgd", 0, "1backprops", data="auto", progress=False, verbose=False)
    assert log[0]["stand_in"] is False and log[0]["dataset"] == "Fashion-MNIST"
    assert offline == []


# --- stand-ins -------------------------------------------------------------------------------

def test_stand_in_mapping():
    assert [data.stand_in(n) for n in ("mnist", "fashion_mnist", "cifar10")] == ["digits"] * 3
    assert data.stand_in("digits") == "digits" and data.stand_in("mnist1d") == "mnist1d"
    assert data.stand_in("Fashion-MNIST") == "digits"
    for real, alts in data.STAND_INS.items():
        assert real not in alts and set(alts) <= {"digits", "mnist1d"}


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    for n in ("mnist", "fashion_mnist", "cifar10", "digits", "mnist1d"):
        assert n in str(info.value)
    with pytest.raises(ValueError):
        data.stand_in("svhn")


def test_fallback_to_stand_in_is_labelled(tmp_path, offline, caplog):
    with caplog.at_level("WARNING", logger="trlib.data"):
        ds = load_dataset_or_stand_in("mnist", root=tmp_path, download=False)
    assert ds.name == "digits" and ds.is_stand_in and ds.stand_in_for == "mnist"
    assert ds.display_name == "sklearn digits (offline stand-in for MNIST)"
    assert "MNIST" not in ds.name.upper()
    assert "stand-in for 'mnist'" in repr(ds)
    records = [r for r in caplog.records if r.name == "trlib.data"]
    assert len(records) == 1 and "sklearn digits (offline stand-in for MNIST)" in records[0].getMessage()

    alt = load_dataset_or_stand_in("cifar10", root=tmp_path, download=False, stand_in="digits", train=False)
    assert alt.name == "digits" and not alt.train and alt.display_name.endswith("stand-in for CIFAR-10)")


def test_fallback_not_used_when_real_dataset_present(tmp_path, caplog):
    fabricate_mnist(tmp_path, "MNIST")
    with caplog.at_level("WARNING", logger="trlib.data"):
        ds = load_dataset_or_stand_in("mnist", root=tmp_path, download=False)
    assert ds.name == "mnist" and not ds.is_stand_in and ds.display_name == "MNIST"
    assert not [r for r in caplog.records if r.name == "trlib.data"]


# --- digits -----------------------------------------------------------------------------------

def test_digits_split_shapes_range_and_content():
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits"), load_dataset("digits", train=False)
    assert train.x.shape == (1437, 1, 8, 8) and test.x.shape == (360, 1, 8, 8)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.x.min().item() == 0.0 and train.x.max().item() == 1.0
    assert not train.is_stand_in and train.name == "digits" and train.display_name == "sklearn digits"
    # Together the splits are exactly the 1,797 images / 16 with their labels.
    ref = load_digits()
    rows = lambda x, y: sorted(zip(map(tuple, x.reshape(len(x), -1).tolist()), y.tolist()))
    both = rows(torch.cat([train.x, test.x]), torch.cat([train.y, test.y]))
    assert both == rows(torch.tensor(ref.images / 16.0, dtype=torch.float32), torch.tensor(ref.target))
    # Stratified: every class is in the test split about 20% of the time.
    counts = torch.bincount(test.y, minlength=10)
    assert counts.min().item() >= 35 and counts.max().item() <= 37


def test_digits_is_deterministic_and_flattens_and_normalizes():
    a, b = load_dataset("digits", train=False), load_dataset("digits", train=False)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    flat = load_dataset("digits", flatten=True)
    assert flat.x.shape == (1437, 64) and flat.input_shape == (64,)
    norm = load_dataset("digits", normalize=True)
    assert abs(norm.x.mean().item()) < 1e-5 and abs(norm.x.std().item() - 1) < 1e-4


def test_dataset_to_device_copies():
    ds = load_dataset("digits", train=False)
    moved = ds.to("meta")  # a real device change without a GPU
    assert moved.x.device.type == "meta" and moved.y.device.type == "meta"
    assert ds.x.device.type == "cpu" and moved.name == ds.name and len(moved) == len(ds)
    assert load_dataset("digits", device="meta").device.type == "meta"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_data_and_batches():
    ds = load_dataset("digits", device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    x, y = next(iter(batches(ds, 64, generator=g)))
    assert x.is_cuda and y.is_cuda and x.shape == (64, 1, 8, 8)


# --- mnist1d ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist1d_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist1d_cache")
    load_dataset("mnist1d", root=root)  # generates once and writes the cache
    return root


def test_mnist1d_shapes_range_and_flags(mnist1d_root):
    train = load_dataset("mnist1d", root=mnist1d_root)
    test = load_dataset("mnist1d", root=mnist1d_root, train=False)
    assert train.x.shape == (4000, 40) and test.x.shape == (1000, 40)
    assert train.input_shape == (40,) and train.num_classes == 10
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    both = torch.cat([train.x, test.x])
    assert both.min().item() == 0.0 and both.max().item() == 1.0
    assert set(train.y.tolist()) == set(range(10))
    assert train.name == "mnist1d" and train.display_name == "MNIST-1D" and not train.is_stand_in


def test_mnist1d_matches_the_generator_and_the_cache(mnist1d_root):
    import mnist1d.data

    assert (mnist1d_root / "mnist1d").is_dir() and any((mnist1d_root / "mnist1d").glob("*.npz"))
    ref = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    lo = min(ref["x"].min(), ref["x_test"].min())
    hi = max(ref["x"].max(), ref["x_test"].max())
    for train, xk, yk in ((True, "x", "y"), (False, "x_test", "y_test")):
        a = load_dataset("mnist1d", root=mnist1d_root, train=train)  # from the cache
        b = load_dataset("mnist1d", root=mnist1d_root, train=train)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
        assert a.y.tolist() == ref[yk].tolist()
        np.testing.assert_allclose(a.x.numpy(), (ref[xk] - lo) / (hi - lo), atol=1e-6)


def test_mnist1d_generation_leaves_global_rngs_alone(tmp_path, monkeypatch):
    import mnist1d.data

    def fake_make_dataset(args):  # like the real one: reseeds the global RNGs
        np.random.seed(args.seed)
        random.seed(args.seed)
        x = np.random.randn(10, 40)
        return {"x": x[:8], "x_test": x[8:], "y": np.arange(8) % 10, "y_test": np.arange(2)}

    monkeypatch.setattr(mnist1d.data, "make_dataset", fake_make_dataset)
    np.random.seed(7)
    random.seed(7)
    expected_np, expected_py = np.random.get_state()[1].copy(), random.getstate()
    ds = load_dataset("mnist1d", root=tmp_path)
    assert len(ds) == 8
    assert np.array_equal(np.random.get_state()[1], expected_np) and random.getstate() == expected_py


# --- batches ----------------------------------------------------------------------------------

def test_batches_cover_every_index_once_and_stay_aligned():
    n = 103
    x, y = torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n) * 2
    g = torch.Generator().manual_seed(0)
    got = list(batches((x, y), 10, generator=g))
    assert [len(b[0]) for b in got] == [10] * 10 + [3]
    xs, ys = torch.cat([b[0] for b in got]), torch.cat([b[1] for b in got])
    assert sorted(ys.tolist()) == list(range(0, 2 * n, 2))
    assert torch.equal(ys, 2 * xs.squeeze(1).long())  # rows stay paired
    assert ys.tolist() != sorted(ys.tolist())  # actually shuffled

    dropped = list(batches((x, y), 10, generator=g, drop_last=True))
    assert [len(b[1]) for b in dropped] == [10] * 10
    assert len(set(torch.cat([b[1] for b in dropped]).tolist())) == 100


def test_batches_reproducible_with_seeded_generator():
    xs = torch.arange(50)
    order = lambda seed: torch.cat(list(batches(xs, 8, generator=torch.Generator().manual_seed(seed))))
    assert torch.equal(order(3), order(3))
    assert not torch.equal(order(3), order(4))
    g = torch.Generator().manual_seed(3)
    first, second = torch.cat(list(batches(xs, 8, generator=g))), torch.cat(list(batches(xs, 8, generator=g)))
    assert not torch.equal(first, second)  # the generator advances between epochs
    assert torch.equal(torch.cat(list(batches(xs, 8, shuffle=False))), xs)


def test_batches_of_a_dataset():
    ds = load_dataset("digits", train=False)
    got = list(batches(ds, 100, shuffle=False))
    assert [len(x) for x, _ in got] == [100, 100, 100, 60]
    assert torch.equal(got[0][0], ds.x[:100]) and torch.equal(got[-1][1], ds.y[300:])


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8", None])
def test_batches_reject_bad_batch_size(bad):
    with pytest.raises(ValueError, match="batch_size"):
        batches(torch.arange(5), bad)  # raised at the call, not at the first next()


def test_batches_reject_bad_data():
    with pytest.raises(ValueError, match="length"):
        batches((torch.arange(5), torch.arange(4)), 2)
    with pytest.raises(ValueError):
        batches(([1, 2, 3],), 2)
    with pytest.raises(ValueError):
        batches((), 2)
    with pytest.raises(ValueError, match="generator"):
        batches(torch.arange(5), 2, generator=np.random.default_rng(0))


def test_load_stand_in_is_marked_without_trying_the_real_dataset(monkeypatch):
    from trlib import data as trdata

    tried = []
    real_load = trdata.load_dataset
    monkeypatch.setattr(trdata, "load_dataset", lambda name, **kw: tried.append(name) or real_load(name, **kw))
    ds = trdata.load_stand_in("cifar10")
    assert tried == ["digits"]
    assert ds.is_stand_in and ds.stand_in_for == "cifar10"
    assert ds.display_name == "sklearn digits (offline stand-in for CIFAR-10)"
    assert "CIFAR-10" != ds.display_name


# --- subsets ----------------------------------------------------------------------------

def test_subset_keeps_each_class_share_with_rows_of_the_split():
    full = load_dataset("digits")
    counts = torch.bincount(full.y, minlength=10)
    small = data.subset(full, 301, seed=3)
    assert len(small) == 301 and small.train and not small.is_stand_in
    got = torch.bincount(small.y, minlength=10)
    share = 301 * counts.double() / len(full)  # each class within one sample of its exact share
    assert torch.all((got.double() - share).abs() < 1) and int(got.sum()) == 301
    rows = {tuple(r.tolist()): int(c) for r, c in zip(full.x.reshape(len(full), -1), full.y)}
    assert all(rows[tuple(r.tolist())] == int(c) for r, c in zip(small.x.reshape(len(small), -1), small.y))
    assert small.display_name == "sklearn digits (301 of 1,437 training images, seed 3)"
    assert small.name == "digits_subset301_seed3"


def test_subset_is_fixed_by_its_seed_and_draws_without_replacement():
    full = load_dataset("digits", train=False)
    a, b, c = (data.subset(full, 50, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    flat = full.x.reshape(len(full), -1)
    idx = [int(torch.nonzero((flat == r).all(1)).flatten()[0]) for r in a.x.reshape(len(a), -1)]
    assert idx == sorted(idx) and len(set(idx)) == 50  # original order, no sample twice
    assert "50 of 360 test images" in a.display_name


def test_subset_of_a_small_split_is_the_split_and_bad_sizes_are_named():
    full = load_dataset("digits", train=False)
    assert data.subset(full, len(full)) is full and data.subset(full, 10**6) is full
    for bad in (0, -5, 2.5, True, "100"):
        with pytest.raises(ValueError, match="invalid subset size"):
            data.subset(full, bad)
    with pytest.raises(ValueError, match="invalid subset seed"):
        data.subset(full, 10, seed=-1)


def test_load_data_subsets_name_the_runs_and_their_files(tmp_path, offline):
    from trlib.experiments import load_data, run

    fabricate_mnist(tmp_path, "FashionMNIST", n_train=60, n_test=20, compress=True)
    train, test = load_data("fashion_mnist_mlp", "real", root=tmp_path, subset=30, test_subset=10, seed=2)
    assert (len(train), len(test)) == (30, 10) and not train.is_stand_in
    assert train.display_name == "Fashion-MNIST (30 of 60 training images, seed 2)"
    log = run("fashion_mnist_mlp", "sgd", 0, "2backprops", out=tmp_path / "runs", datasets=(train, test),
              progress=False, verbose=False)
    assert log[-1]["dataset"] == train.display_name and log[-1]["stand_in"] is False
    assert (tmp_path / "runs" / "fashion_mnist_mlp__sgd__fashion_mnist_subset30_seed2__seed0.jsonl").is_file()
    whole = load_data("fashion_mnist_mlp", "real", root=tmp_path)
    assert (len(whole[0]), len(whole[1])) == (60, 20)
    with pytest.raises(ValueError, match="invalid test_subset"):
        load_data("fashion_mnist_mlp", "real", root=tmp_path, test_subset=0)
