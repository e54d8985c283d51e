"""Labelled evaluation data: a train split (the probes fit on it) and a val split (they are scored on it).

Sources:
- ``digits``: scikit-learn's bundled 8x8 digits (no download), the fixed stratified train/test split of
  ``aimkern.data.digits.digits_split``, upsampled and standardized exactly as pretraining sees them.
- two ImageFolder trees (``--train DIR --val DIR``): class sub-folders of images, read without augmentation
  (resize to ``img_size / 0.875`` then center crop, as ImageNet evaluation does) through the training
  decoder (``aimkern.data.decode``: libjpeg-turbo at a DCT scale, uint8 crop and resize); their batches are
  uint8, normalized on the device by ``extract`` as the training step does. The val tree's classes are
  mapped onto the train tree's by name; a val class that train lacks is an error (no probe could predict it).

Every split yields its images in caller-chosen batches of indices, so extraction can hand batch b to rank
b % W and a 2-process run sees exactly the batches of a 1-process run.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, List, Sequence

import numpy as np
import torch

from ..data.digits import digits_split, digits_to_images

# Center-crop ratio of the standard ImageNet evaluation transform (resize to img / 0.875, crop img).
CROP_RATIO = 0.875


@dataclass
class Split:
    """One split: ``n`` images, their (n,) int64 ``labels``, and ``batches(index_batches)`` which yields one
    (B, C, H, W) image tensor per list of indices: uint8 images (ImageFolder trees) or float32 model input
    (digits); ``aimkern.data.inputs.model_input`` makes either the model's input. ``identity`` names the
    content for the cache key."""
    name: str
    labels: np.ndarray
    batches: Callable[[Sequence[Sequence[int]]], Iterator[torch.Tensor]]
    identity: str

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class Labelled:
    """A train and a val split over the same ``classes`` (label i is ``classes[i]``)."""
    name: str
    train: Split
    val: Split
    classes: List[str]


# ------------------------------------------------------------------------------------------------------
def digits(img_size: int, in_chans: int) -> Labelled:
    """The digits train (1347) / test (450) split at the model's image size and channels."""
    x_train, y_train, x_test, y_test = digits_split()

    def split(name: str, x8: torch.Tensor, y: torch.Tensor) -> Split:
        def batches(index_batches):
            for idx in index_batches:
                yield digits_to_images(x8[torch.as_tensor(list(idx), dtype=torch.long)], img_size, in_chans)

        return Split(name, y.numpy().astype(np.int64), batches, identity=f"digits/{name}/{img_size}/{in_chans}")

    return Labelled("digits", split("train", x_train, y_train), split("val", x_test, y_test),
                    [str(i) for i in range(10)])


# ------------------------------------------------------------------------------------------------------
class CenterDecode:
    """Encoded bytes -> uint8 (in_chans, img_size, img_size): the deterministic evaluation view (resize to
    ``img_size / 0.875``, centre crop) through the training decoder. The normalization (ImageNet statistics,
    or their channel mean for grayscale; pretraining's) happens on the device, in ``extract``."""

    def __init__(self, img_size: int, in_chans: int):
        from ..data.decode import MEAN_STD, center_view

        if in_chans not in MEAN_STD:
            raise ValueError(f"ImageFolder data is read as RGB or grayscale, but the model has in_chans={in_chans}")
        if img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {img_size}")
        self.img_size, self.in_chans, self.view = img_size, in_chans, center_view(img_size, CROP_RATIO)

    def __call__(self, data: bytes) -> torch.Tensor:
        from ..data.decode import decode_view

        return decode_view(data, self.view, self.img_size, self.in_chans)


def eval_transform(img_size: int, in_chans: int) -> CenterDecode:
    """Deterministic evaluation transform (an ImageFolder ``transform`` over ``aimkern.data.folder.read_file``
    bytes): resize, center crop, in uint8."""
    return CenterDecode(img_size, in_chans)


def _check_tree(root: str, what: str) -> List[str]:
    """The class sub-folders of ``root``, or a clear error for a missing, empty or class-less tree."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{what} {root!r} is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise ValueError(f"{what} {root!r} has no class sub-folders: expected an ImageFolder tree "
                         f"({root}/CLASS_NAME/IMAGE.jpg, one folder per class)")
    return classes


def _folder_identity(root: str, samples: list) -> str:
    """A digest of the tree's files (relative path, size, modification time) and labels: a changed, added or
    removed image gives a new cache key."""
    h = hashlib.sha256(os.path.abspath(root).encode())
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{os.path.relpath(path, root)}|{st.st_size}|{st.st_mtime_ns}|{label}\n".encode())
    return h.hexdigest()


def image_folders(train_root: str, val_root: str, img_size: int, in_chans: int, workers: int = 0, *,
                  transform=None, collate_fn=None, tag: str = "") -> Labelled:
    """Labelled train / val ImageFolder trees; val labels follow train's class indices by class name.
    ``transform`` (bytes -> image; default the centre crop at img_size), ``collate_fn`` (default: a stacked
    batch) and ``tag`` (in the cache identity) let ``aimkern.eval.native`` read images at their own sizes."""
    from torchvision.datasets import ImageFolder

    from ..data.folder import read_file

    train_classes = _check_tree(train_root, "--train")
    val_classes = _check_tree(val_root, "--val")
    unknown = sorted(set(val_classes) - set(train_classes))
    if unknown:
        shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise ValueError(f"--val has {len(unknown)} class(es) that --train lacks ({shown}): a probe trained on "
                         f"{train_root} cannot predict them; give both trees the same class folders")
    transform = transform or eval_transform(img_size, in_chans)

    def split(name: str, root: str) -> Split:
        try:
            folder = ImageFolder(root, loader=read_file, transform=transform)  # bytes: decoded by transform
        except FileNotFoundError as e:  # class folders without a single image
            raise ValueError(f"--{name} {root!r}: {e}") from None
        # Map this tree's class indices to train's by name (val may lack some of train's classes).
        to_train = np.array([train_classes.index(c) for c in folder.classes], dtype=np.int64)
        labels = to_train[np.array(folder.targets, dtype=np.int64)]
        samples = [(p, int(to_train[t])) for p, t in folder.samples]

        def batches(index_batches):
            loader = torch.utils.data.DataLoader(
                folder, batch_sampler=[list(b) for b in index_batches], num_workers=workers,
                **({"collate_fn": collate_fn} if collate_fn is not None else {}),
            )
            for batch in loader:
                yield batch if collate_fn is not None else batch[0]

        # "decode2": the libjpeg-turbo decoder's pixels; features cached from the PIL transform are not reused.
        identity = f"folder/{_folder_identity(root, samples)}/{img_size}/decode2{tag}"
        return Split(name, labels, batches, identity=identity)

    return Labelled(f"folders:{os.path.basename(os.path.normpath(train_root))}", split("train", train_root),
                    split("val", val_root), train_classes)


def load(data: str, train: str, val: str, img_size: int, in_chans: int, workers: int = 0) -> Labelled:
    """The labelled data the command line names: ``--train`` / ``--val`` trees when given, else ``data``."""
    if train or val:
        if not (train and val):
            raise ValueError("--train and --val go together: give both ImageFolder trees")
        return image_folders(train, val, img_size, in_chans, workers)
    if data == "digits":
        return digits(img_size, in_chans)
    raise ValueError(f"--data must be 'digits' (or give --train DIR --val DIR), got {data!r}")
