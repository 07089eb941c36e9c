"""Datasets for the paper's experiments, held whole as tensors, with offline stand-ins.

The paper trains on MNIST, Fashion-MNIST and CIFAR-10 (downloaded through torchvision).
Where those cannot be downloaded, two small datasets that need no network stand in:

* ``"digits"``: scikit-learn's 8x8 handwritten digits (1,797 images, shipped in the wheel),
  the stand-in for every image classifier and autoencoder task;
* ``"mnist1d"``: MNIST-1D (5,000 sequences of 40 values, generated locally), a second,
  flat stand-in that suits the MLP and autoencoder tasks.

A stand-in keeps its own name: ``Dataset.name`` is ``"digits"``, never ``"mnist"``, and
``Dataset.display_name`` says what it stands in for, so no result can be mislabelled.

Where the data are found, without configuration (:func:`search_path`): MNIST and
Fashion-MNIST are read from the first complete copy of their four IDX files, gzip-compressed
or not, in torchvision's layout (``<root>/FashionMNIST/raw/``) below ``$TRLIB_DATA``, then
below the cache ``~/.cache/trlib/data``, then in the system-wide copy of a distribution package
(Debian's and Ubuntu's ``dataset-fashion-mnist`` installs ``/usr/share/datasets/fashion-mnist``).
The files are read directly (:func:`read_idx`): no checksum is asked of a local copy, and
nothing is downloaded when one exists. Only when there is none, torchvision downloads the
dataset into ``$TRLIB_DATA`` or the cache. ``Dataset.source`` says which copy was read.

Preprocessing: every input is scaled to [0, 1]. CIFAR-10 is then standardised per channel
with the usual training-set mean and std (``normalize=True`` by default); the other datasets
stay in [0, 1] by default (``normalize=False``) because the paper's autoencoders have sigmoid
outputs and reconstruct their [0, 1] inputs. The original code left CIFAR-10 at 0..255: we don't.

Example:
    >>> from trlib.data import load_dataset, batches
    >>> train = load_dataset("digits")
    >>> train
    Dataset('digits', train, 1437 samples, input_shape=(1, 8, 8), 10 classes, device=cpu)
    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = next(iter(batches(train, 128, generator=g)))
    >>> tuple(x.shape), y.dtype
    ((128, 1, 8, 8), torch.int64)
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging
import os
import random
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ._atomic import atomic_write

__all__ = ["DATASETS", "STAND_INS", "Dataset", "DatasetInfo", "DatasetUnavailableError", "batches", "dataset_info",
           "default_root", "load_dataset", "load_dataset_or_stand_in", "load_stand_in", "read_idx", "search_path",
           "stand_in", "subset"]

logger = logging.getLogger(__name__)


class DatasetUnavailableError(RuntimeError):
    """A dataset is neither on disk nor downloadable; the message says how to get it."""


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset (see :func:`dataset_info`)."""

    display_name: str
    input_shape: tuple
    num_classes: int
    normalize: bool                 # default of load_dataset's `normalize`
    mean_std: Optional[tuple] = None  # per-channel constants; None: computed from the train split
    torchvision_class: Optional[str] = None
    folder: Optional[str] = None    # where torchvision looks, relative to root
    files: tuple = ()               # what a user must put in `folder` to load offline
    system_dirs: tuple = ()         # read-only copies installed by a distribution package
    package: Optional[str] = None   # the Debian/Ubuntu package that installs them


_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_DATASETS = {
    "mnist": DatasetInfo("MNIST", (1, 28, 28), 10, False, ((0.1307,), (0.3081,)), "MNIST", "MNIST/raw", _IDX_FILES),
    "fashion_mnist": DatasetInfo("Fashion-MNIST", (1, 28, 28), 10, False, ((0.2860,), (0.3530,)), "FashionMNIST",
                                 "FashionMNIST/raw", _IDX_FILES, ("/usr/share/datasets/fashion-mnist",),
                                 "dataset-fashion-mnist"),
    "cifar10": DatasetInfo(
        # True per-pixel std of the training set (not the often-copied 0.2023/0.1994/0.2010).
        "CIFAR-10", (3, 32, 32), 10, True,
        ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), "CIFAR10", "cifar-10-batches-py",
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
         "test_batch", "batches.meta"),
    ),
    "digits": DatasetInfo("sklearn digits", (1, 8, 8), 10, False),
    "mnist1d": DatasetInfo("MNIST-1D", (40,), 10, False),
}

#: Names accepted by :func:`load_dataset`.
DATASETS = tuple(_DATASETS)

#: Offline stand-ins for each downloadable dataset, preferred first. ``digits`` keeps the
#: image layout (1x8x8), so every task runs on it; ``mnist1d`` is flat (40 features) and
#: only suits the MLP and autoencoder tasks.
STAND_INS = {name: ("digits", "mnist1d") for name in ("mnist", "fashion_mnist", "cifar10")}


@dataclass(frozen=True)
class Dataset:
    """A whole split as two tensors, plus what it is.

    ``x`` is float32 of shape ``(len, *input_shape)``, ``y`` int64 class labels.
    ``name`` is the dataset actually loaded (``"digits"`` even when it stands in for
    MNIST); ``display_name`` is what plots and tables should print; ``source`` is the folder
    the files were read from (None for data generated or shipped with a package).
    """

    x: torch.Tensor = field(repr=False)
    y: torch.Tensor = field(repr=False)
    name: str
    display_name: str
    num_classes: int
    input_shape: tuple
    train: bool = True
    is_stand_in: bool = False
    stand_in_for: Optional[str] = None
    source: Optional[str] = None  # the folder the files were read from (None: generated or shipped)

    def __len__(self) -> int:
        return self.y.shape[0]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def to(self, device) -> "Dataset":
        """A copy with both tensors on ``device``."""
        return dataclasses.replace(self, x=self.x.to(device), y=self.y.to(device))

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        what = f" stand-in for {self.stand_in_for!r}," if self.is_stand_in else ""
        return (f"Dataset({self.name!r},{what} {split}, {len(self)} samples, "
                f"input_shape={self.input_shape}, {self.num_classes} classes, device={self.device})")


def default_root() -> Path:
    """Where downloads and caches go: ``$TRLIB_DATA`` if set, else ``~/.cache/trlib/data``."""
    return Path(os.environ.get("TRLIB_DATA") or _cache_root()).expanduser()


def _cache_root() -> Path:
    return Path.home() / ".cache" / "trlib" / "data"


def _root(root) -> Path:
    return Path(root).expanduser() if root is not None else default_root()


def search_path(name: str, root: Union[str, os.PathLike, None] = None) -> list:
    """The folders searched for a local copy of ``name``'s files, in order.

    Without ``root``: torchvision's layout below ``$TRLIB_DATA`` (when set) and below the cache
    ``~/.cache/trlib/data``, then the system-wide copies of a distribution package. With
    ``root``: torchvision's layout below ``root``, then the system-wide copies. Datasets
    without files (``digits``, ``mnist1d``) have an empty search path.

    >>> [str(p) for p in search_path("fashion_mnist", root="/data")]
    ['/data/FashionMNIST/raw', '/usr/share/datasets/fashion-mnist']
    """
    spec = _DATASETS[_canonical(name)]
    if spec.folder is None:
        return []
    if root is not None:
        roots = [Path(root).expanduser()]
    else:
        roots = [Path(os.environ["TRLIB_DATA"]).expanduser()] if os.environ.get("TRLIB_DATA") else []
        roots.append(_cache_root())
    folders = [r / spec.folder for r in roots] + [Path(d) for d in spec.system_dirs]
    return list(dict.fromkeys(folders))  # without repeats, in order


def _canonical(name: str) -> str:
    key = str(name).lower().replace("-", "_")
    if key not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return key


def dataset_info(name: str) -> DatasetInfo:
    """Display name, per-sample input shape, class count and preprocessing defaults of ``name``,
    without loading anything.

    >>> dataset_info("cifar10").input_shape
    (3, 32, 32)
    """
    return _DATASETS[_canonical(name)]


def stand_in(name: str) -> str:
    """The preferred offline stand-in for ``name`` (``"digits"`` for MNIST, Fashion-MNIST
    and CIFAR-10; see :data:`STAND_INS` for the alternatives). A dataset that needs no
    network (``digits``, ``mnist1d``) is its own stand-in.

    >>> stand_in("cifar10")
    'digits'
    """
    key = _canonical(name)
    return STAND_INS.get(key, (key,))[0]


def load_dataset(
    name: str,
    *,
    root: Union[str, os.PathLike, None] = None,
    train: bool = True,
    device=None,
    download: Optional[bool] = None,
    flatten: bool = False,
    normalize: Optional[bool] = None,
) -> Dataset:
    """Load one split of a dataset as whole tensors.

    Args:
        name: one of :data:`DATASETS` (``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``,
            ``"digits"``, ``"mnist1d"``).
        root: data directory (default :func:`default_root`). torchvision's layout is used
            below it (``<root>/MNIST/raw/``, ``<root>/cifar-10-batches-py/``); MNIST-1D is
            cached in ``<root>/mnist1d/``. MNIST and Fashion-MNIST: the first complete copy on
            :func:`search_path`.
        train: the training split if True, else the test split. ``digits`` has no official
            split: a fixed stratified 80/20 split (seed 0) is used.
        device: where to put the tensors (default: CPU).
        download: ``False`` never touches the network; ``None`` or ``True`` download a
            missing torchvision dataset into ``root`` (a local copy is always used as it is,
            without a checksum and without a download attempt).
        flatten: reshape inputs to ``(len, prod(input_shape))``.
        normalize: standardise per channel (default: CIFAR-10 only, see above) with the
            published training-set constants, or for digits and MNIST-1D their training split's.

    Raises:
        DatasetUnavailableError: the dataset is missing and could not be downloaded; the
            message lists the folders searched and how to get the files.
        ValueError: unknown name, or a local file that is not a valid IDX file of the
            dataset (the message names the file).

    >>> test = load_dataset("digits", train=False, flatten=True)
    >>> tuple(test.x.shape), test.x.min().item(), test.x.max().item()
    ((360, 64), 0.0, 1.0)
    """
    key = _canonical(name)
    spec = _DATASETS[key]
    if key in _IDX_DATASETS:
        x, y, source = _load_idx_dataset(key, root, train, download)
    else:
        x, y = _load_raw(key, _root(root), train, download)
        source = str(_root(root) / spec.folder) if spec.folder else None
    if spec.normalize if normalize is None else normalize:
        mean, std = spec.mean_std or _train_stats(key, _root(root))
        shape = (1, -1) + (1,) * (x.dim() - 2) if len(mean) > 1 else ()
        x = (x - torch.tensor(mean).reshape(shape)) / torch.tensor(std).reshape(shape)
    input_shape = tuple(x.shape[1:])
    if flatten:
        x = x.reshape(len(x), -1)
        input_shape = (x.shape[1],)
    ds = Dataset(x.contiguous(), y, key, spec.display_name, spec.num_classes, input_shape, train, source=source)
    return ds.to(device) if device is not None else ds


def load_dataset_or_stand_in(name: str, *, stand_in: Optional[str] = None, **kwargs) -> Dataset:
    """:func:`load_dataset`, falling back to an offline stand-in when ``name`` is unavailable.

    The fallback is announced by one warning on the ``trlib.data`` logger, and the result is
    marked: ``is_stand_in=True``, ``stand_in_for=name``, and a ``display_name`` such as
    ``"sklearn digits (offline stand-in for MNIST)"``. ``stand_in`` picks another entry of
    :data:`STAND_INS` (e.g. ``"mnist1d"``). ``kwargs`` go to both loads.

    >>> ds = load_dataset_or_stand_in("mnist", download=False)  # doctest: +SKIP
    sklearn digits (offline stand-in for MNIST) is used: MNIST is not available ...
    """
    key = _canonical(name)
    alt = _canonical(stand_in) if stand_in is not None else STAND_INS.get(key, (key,))[0]
    try:
        return load_dataset(key, **kwargs)
    except DatasetUnavailableError as err:
        if alt == key:
            raise
        reason = str(err).splitlines()[0]
    ds = load_stand_in(key, stand_in=alt, **kwargs)
    logger.warning("%s is used: %s", ds.display_name, reason)
    return ds


def load_stand_in(name: str, *, stand_in: Optional[str] = None, **kwargs) -> Dataset:
    """The offline stand-in for ``name``, marked as such, without trying the real dataset.

    >>> load_stand_in("mnist").display_name
    'sklearn digits (offline stand-in for MNIST)'
    """
    key = _canonical(name)
    alt = _canonical(stand_in) if stand_in is not None else STAND_INS.get(key, (key,))[0]
    ds = load_dataset(alt, **kwargs)
    if alt == key:
        return ds
    return dataclasses.replace(
        ds, is_stand_in=True, stand_in_for=key,
        display_name=f"{ds.display_name} (offline stand-in for {_DATASETS[key].display_name})",
    )


def subset(data: Dataset, size: int, *, seed: int = 0) -> Dataset:
    r"""A class-stratified random subset of at most ``size`` samples of ``data``, fixed by ``seed``.

    Each class keeps its share: class :math:`c`, holding :math:`n_c` of the :math:`n` samples,
    gets :math:`\lfloor \mathrm{size}\, n_c / n \rfloor` of them, and the samples left over go one
    each to the classes with the largest remainders (ties: the smaller label). Within a class the
    samples are drawn uniformly without replacement; the subset keeps the original order. A
    split no larger than ``size`` is returned as it is.

    The subset is marked: ``display_name`` says how many samples of how many it holds and the
    seed (``"Fashion-MNIST (6,000 of 60,000 training images, seed 0)"``), and ``name`` gets
    the suffix ``_subset<size>_seed<seed>``, so that runs on different subsets never share a file.

    Raises:
        ValueError: ``size`` is not a positive int, or ``seed`` not an int >= 0.

    >>> train = load_dataset("digits")
    >>> small = subset(train, 100, seed=1)
    >>> len(small), small.display_name
    (100, 'sklearn digits (100 of 1,437 training images, seed 1)')
    >>> torch.bincount(small.y).tolist()
    [10, 10, 10, 10, 10, 10, 10, 10, 10, 10]
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"invalid subset size {size!r}: expected an int >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"invalid subset seed {seed!r}: expected an int >= 0")
    n = len(data)
    if size >= n:
        return data
    labels = data.y.cpu()
    counts = torch.bincount(labels, minlength=data.num_classes).tolist()
    quota = [size * c // n for c in counts]
    by_remainder = sorted(range(len(counts)), key=lambda k: (-(size * counts[k] % n), k))
    for k in by_remainder[:size - sum(quota)]:
        quota[k] += 1
    g = torch.Generator().manual_seed(seed)
    keep = []
    for k, q in enumerate(quota):
        members = torch.nonzero(labels == k).flatten()
        keep.append(members[torch.randperm(len(members), generator=g)[:q]])
    idx = torch.sort(torch.cat(keep)).values.to(data.device)
    images = "training images" if data.train else "test images"
    return dataclasses.replace(
        data, x=data.x[idx].contiguous(), y=data.y[idx], name=f"{data.name}_subset{size}_seed{seed}",
        display_name=f"{data.display_name} ({size:,} of {n:,} {images}, seed {seed})")


def batches(
    data: Union[Dataset, torch.Tensor, Sequence[torch.Tensor]],
    batch_size: int,
    *,
    shuffle: bool = True,
    generator: Optional[torch.Generator] = None,
    drop_last: bool = False,
) -> Iterator:
    """One epoch of mini-batches, sliced from tensors already on their device.

    ``data`` is a :class:`Dataset` (yields ``(x, y)``), a tuple of equally long tensors
    (yields tuples) or one tensor (yields tensors). With ``shuffle`` the order is a
    ``torch.randperm`` drawn from ``generator``, so a seeded generator makes epochs
    reproducible. Every sample appears exactly once per epoch (the last batch is smaller
    unless ``drop_last``).

    >>> xs = torch.arange(10.0)
    >>> [b.tolist() for b in batches(xs, 4, shuffle=False)]
    [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0]]
    """
    # Validate here, not inside the generator, so bad arguments fail at the call.
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    single = isinstance(data, torch.Tensor)
    tensors = (data.x, data.y) if isinstance(data, Dataset) else (data,) if single else tuple(data)
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        raise ValueError("data must be a Dataset, a tensor, or a sequence of tensors")
    n = len(tensors[0])
    if any(len(t) != n for t in tensors):
        raise ValueError(f"tensors differ in length: {[len(t) for t in tensors]}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return _batches(tensors, n, batch_size, shuffle, generator, drop_last, single)


def _batches(tensors, n, batch_size, shuffle, generator, drop_last, single):
    order = None
    if shuffle:
        gen_device = generator.device if generator is not None else "cpu"
        order = torch.randperm(n, generator=generator, device=gen_device).to(tensors[0].device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            out = tuple(t[start:start + batch_size] for t in tensors)
        else:
            idx = order[start:start + batch_size]
            out = tuple(t[idx] for t in tensors)
        yield out[0] if single else out


# --- loaders: each returns (x float32 in [0, 1] of shape (N, *input_shape), y int64) ---

def _load_raw(key: str, root: Path, train: bool, download: Optional[bool]):
    if key == "digits":
        return _load_digits(train)
    if key == "mnist1d":
        return _load_mnist1d(root, train)
    return _load_torchvision(key, root, train, download)


# --- IDX files (MNIST, Fashion-MNIST) ---

_IDX_DATASETS = ("mnist", "fashion_mnist")
# IDX element types: the third byte of the magic number (LeCun et al., the MNIST database page).
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """The array stored in an IDX file (the format of MNIST and Fashion-MNIST), gzip-compressed
    or not (recognised by its first bytes, not by its name).

    An IDX file is a magic number ``0x00 0x00 t n`` (``t`` the element type, ``0x08`` for
    unsigned bytes; ``n`` the number of dimensions), then ``n`` big-endian 32-bit sizes, then
    the elements in row-major order (LeCun, Cortes and Burges, *The MNIST database*).

    Raises:
        ValueError: the file is not a complete IDX file (the message names it).

    >>> import gzip, struct, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte.gz")
    >>> with gzip.open(path, "wb") as f:
    ...     _ = f.write(struct.pack(">BBBBI", 0, 0, 0x08, 1, 3) + bytes([7, 2, 1]))
    >>> read_idx(path)
    array([7, 2, 1], dtype=uint8)
    """
    path = Path(path)
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:  # a truncated or damaged gzip stream
        raise ValueError(f"{path} is not a readable gzip file ({err}); delete it or replace it") from err
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an IDX file (its first bytes are {data[:4].hex() or 'missing'}, "
                         "expected 0000 followed by a type code and the number of dimensions)")
    ndim, start = data[3], 4 + 4 * data[3]
    if len(data) < start:
        raise ValueError(f"{path} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", data[4:start])
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - start != expected:
        raise ValueError(f"{path} holds {len(data) - start} bytes of data where its header "
                         f"{tuple(shape)} promises {expected}: the file is truncated or damaged")
    return np.frombuffer(data, dtype=dtype, offset=start).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Optional[Path]:
    for candidate in (folder / stem, folder / f"{stem}.gz"):  # the uncompressed file reads faster
        if candidate.is_file():
            return candidate
    return None


def _find_idx_copy(key: str, root) -> Optional[Path]:
    for folder in search_path(key, root):
        if all(_idx_file(folder, stem) is not None for stem in _DATASETS[key].files):
            return folder
    return None


def _load_idx_dataset(key: str, root, train: bool, download: Optional[bool]):
    spec = _DATASETS[key]
    folder = _find_idx_copy(key, root)
    if folder is None:
        target = _root(root)
        if download is False:
            raise DatasetUnavailableError(_missing_message(key, root, "download=False"))
        _load_torchvision(key, target, train, True, searched=root)  # downloads into target, or raises
        folder = target / spec.folder
    split = "train" if train else "t10k"
    images_path = _idx_file(folder, f"{split}-images-idx3-ubyte")
    labels_path = _idx_file(folder, f"{split}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != spec.input_shape[1:]:
        raise ValueError(f"{images_path} holds {images.dtype} images of shape {images.shape[1:]}, "
                         f"expected uint8 images of shape {spec.input_shape[1:]} for {spec.display_name}")
    if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
        raise ValueError(f"{labels_path} holds {labels.dtype} labels of shape {labels.shape}, expected "
                         f"{len(images)} uint8 labels to match {images_path.name}")
    if len(labels) and labels.max() >= spec.num_classes:
        raise ValueError(f"{labels_path} has a label {labels.max()}, outside 0..{spec.num_classes - 1}")
    x = torch.from_numpy(images.astype(np.float32)).div_(255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y, str(folder)


def _load_torchvision(key, root, train, download, searched=None):
    spec = _DATASETS[key]
    searched = root if searched is None else searched
    try:
        import torchvision.datasets as tvd
    except ImportError as err:  # an optional dependency of trlib
        raise ImportError(f"loading {spec.display_name} needs torchvision: pip install torchvision") from err
    cls = getattr(tvd, spec.torchvision_class)
    try:
        # Local files first: this never touches the network.
        tv = cls(str(root), train=train, download=False)
    except RuntimeError as missing:
        if download is False:
            raise DatasetUnavailableError(_missing_message(key, searched, "download=False")) from missing
        try:
            tv = cls(str(root), train=train, download=True)
        except Exception as failed:  # URLError, HTTP errors, md5 mismatch: all mean "can't get it"
            # torchvision's MNIST error lists every mirror; the first and last lines say enough.
            lines = [ln.strip() for ln in str(failed).splitlines() if ln.strip()] or [""]
            detail = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
            why = f"the download failed ({type(failed).__name__}: {detail[:300]})"
            raise DatasetUnavailableError(_missing_message(key, searched, why)) from failed
    # Whole arrays at once: per-item PIL transforms would take minutes for 60k images.
    data = torch.as_tensor(np.asarray(tv.data))
    if data.dim() == 4:  # CIFAR arrays are NHWC
        data = data.permute(0, 3, 1, 2)
    else:
        data = data.unsqueeze(1)
    x = data.to(torch.float32).div_(255.0)
    y = torch.as_tensor(np.asarray(tv.targets), dtype=torch.int64)
    return x, y


def _missing_message(key: str, root, why: str) -> str:
    spec = _DATASETS[key]
    target = _root(root)
    if key in _IDX_DATASETS:
        places = [str(p) for p in search_path(key, root)]
        where = places[0] if len(places) == 1 else f"{', '.join(places[:-1])} or {places[-1]}"
        how = (f"put the four files {', '.join(f + '.gz' for f in spec.files)} (gzip-compressed or not, "
               f"from the dataset's official site) into {target / spec.folder}/")
        if spec.package:
            how = f"install the package {spec.package} (Debian, Ubuntu: apt-get install {spec.package}), or {how}"
    else:
        where = str(target / spec.folder)
        how = (f"put the extracted folder cifar-10-batches-py/ (from cifar-10-python.tar.gz) in {target}/, "
               f"or put cifar-10-python.tar.gz itself in {target}/ and call with download=True")
    alts = " or ".join(f"load_dataset({s!r})" for s in STAND_INS[key])
    return (
        f"{spec.display_name} ({key!r}) is not available: there is no complete copy in {where} and {why}.\n"
        f"To get it: {how}; or run load_dataset({key!r}, root={str(target)!r}, download=True) once on a machine "
        f"with internet access. The root defaults to $TRLIB_DATA or ~/.cache/trlib/data.\n"
        f"Offline stand-ins: {alts}, or load_dataset_or_stand_in({key!r})."
    )


def _load_digits(train: bool):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    # Pixel values are integers 0..16.
    x = torch.as_tensor(d.images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    y = torch.as_tensor(d.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=0.2, random_state=0, stratify=d.target
    )
    idx = torch.as_tensor(idx_train if train else idx_test)
    return x[idx], y[idx]


def _load_mnist1d(root: Path, train: bool):
    path = root / "mnist1d" / "mnist1d_default_seed42.npz"
    if path.is_file():
        arrays = dict(np.load(path))
    else:
        import mnist1d.data  # never mnist1d's get_dataset: it tries the network

        # make_dataset reseeds numpy's and Python's global RNGs; leave the caller's alone.
        np_state, py_state = np.random.get_state(), random.getstate()
        try:
            d = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        arrays = {k: np.asarray(d[k]) for k in ("x", "y", "x_test", "y_test")}
        try:  # the cache is an optimisation: a read-only root still works
            path.parent.mkdir(parents=True, exist_ok=True)
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            atomic_write(path, buffer.getvalue())
        except OSError:
            pass
    # The generated values are standardised reals (about -5.5..4.5); map the range of the
    # whole generated set (both splits) onto [0, 1] so that both splits lie in [0, 1].
    lo = min(arrays["x"].min(), arrays["x_test"].min())
    hi = max(arrays["x"].max(), arrays["x_test"].max())
    xs, ys = (arrays["x"], arrays["y"]) if train else (arrays["x_test"], arrays["y_test"])
    x = torch.as_tensor((xs - lo) / (hi - lo), dtype=torch.float32)
    return x, torch.as_tensor(ys, dtype=torch.int64)


def _train_stats(key: str, root: Path):
    x, _ = _load_raw(key, root, True, False)
    if x.dim() == 4:
        return tuple(x.mean((0, 2, 3)).tolist()), tuple(x.std((0, 2, 3)).tolist())
    return (x.mean().item(),), (x.std().item(),)
