"""Fashion-MNIST from the official gzipped idx files, as standardized tensors.

NormProp assumes a standardized network input (docs/method.md section 5), so the loader returns images
as float32 ``(N, 1, 28, 28)`` and a :func:`standardize_images` helper that uses the *training*
split's mean and std. The files are the ones the Debian package ``dataset-fashion-mnist``
installs (``/usr/share/datasets/fashion-mnist/``); nothing is downloaded.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import NormPropError

#: Where ``apt-get install dataset-fashion-mnist`` puts the idx files.
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL_HINT = "apt-get install dataset-fashion-mnist (as root), or pass the folder with --data-dir"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: idx type codes (the third byte of the magic number) this loader reads.
_IDX_UBYTE = 0x08


class DatasetNotFoundError(NormPropError):
    """The dataset files are not where they were looked for."""


class DatasetFormatError(NormPropError):
    """A dataset file exists but is not what its name says."""


@dataclass(frozen=True)
class ImageSplit:
    """One split: ``images`` uint8 ``(N, 1, H, W)``, ``labels`` int64 ``(N,)``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()

    def subset(self, count: int | None, *, seed: int = 0) -> ImageSplit:
        """``count`` samples drawn without replacement with ``seed`` (all when None or larger)."""
        if count is None or count >= len(self):
            return self
        if count <= 0:
            raise ValueError(f"subset size must be positive, got {count}")
        index = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count]
        return ImageSplit(self.images[index], self.labels[index])


def read_idx(path: Path) -> torch.Tensor:
    """The uint8 tensor stored in an (optionally gzipped) idx file of unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise DatasetFormatError(f"{path}: not an unsigned-byte idx file (magic {data[:4].hex()})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = 1
    for size in shape:
        expected *= size
    if len(data) - header != expected:
        raise DatasetFormatError(f"{path}: header says {shape} ({expected} bytes), file has {len(data) - header}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def load_fashion_mnist(split: str, data_dir: str | Path | None = None) -> ImageSplit:
    """The ``"train"`` (60k) or ``"test"`` (10k) split of Fashion-MNIST from ``data_dir``
    (default :data:`DEFAULT_FASHION_MNIST_DIR`); plain ``.gz``-less files are accepted too."""
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    folder = Path(data_dir) if data_dir is not None else DEFAULT_FASHION_MNIST_DIR
    paths = []
    for name in _FILES[split]:
        candidates = [folder / name, folder / name.removesuffix(".gz")]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise DatasetNotFoundError(
                f"Fashion-MNIST file {name} not found in {folder}. Install it with: {FASHION_MNIST_INSTALL_HINT}"
            )
        paths.append(found)
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DatasetFormatError(f"{folder}: images {images.shape} and labels {labels.shape} do not pair up")
    return ImageSplit(images.unsqueeze(1), labels.long())


def channel_statistics(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 or float ``(N, C, H, W)`` images, in [0, 1] units."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))


def standardize_images(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(images / 255 - mean) / std`` per channel, float32."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    shape = (1, -1, 1, 1)
    return (x - mean.reshape(shape)) / std.reshape(shape)
