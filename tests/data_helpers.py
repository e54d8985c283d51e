"""Tiny image sets for the aimkern.data tests: JPEGs whose mean colour encodes their id, packed into shards."""
import os

import numpy as np
import torch

N_IMAGES = 24  # 3 steps of global batch 8 = one epoch


def colour(i: int):
    """Image i's base RGB colour; colours are >= 40 apart in some channel, so a crop's mean identifies it."""
    return 20 + 40 * (i % 6), 20 + 40 * (i // 6), 128


def make_folder(root, n=N_IMAGES, size=(96, 80), extras=False):
    """An ImageFolder of ``n`` JPEGs (q90, light noise over colour(i)) in two classes; with ``extras`` also a
    grayscale PNG and a corrupt .jpg (which must be skipped)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = os.path.join(root, "ab"[i % 2])
        os.makedirs(folder, exist_ok=True)
        pixels = np.array(colour(i), dtype=np.int16) + rng.integers(-8, 9, (size[1], size[0], 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:03d}.jpg"), quality=90)
    if extras:
        Image.fromarray(rng.integers(0, 256, (50, 60), dtype=np.uint8)).save(os.path.join(root, "a", "gray.png"))
        with open(os.path.join(root, "b", "corrupt.jpg"), "wb") as f:
            f.write(b"\xff\xd8\xff\xe0 not a jpeg")
    return str(root)


def pack_folder(src, dst, shard_size=5):
    from aimkern.data.pack import pack

    pack(str(src), str(dst), shard_size, progress=False)
    return str(dst)


def ids_of(images: torch.Tensor):
    """uint8 or normalized (B, 3, H, W) batch -> the image id of each row (nearest base colour of its mean)."""
    from aimkern.data.decode import MEAN_STD

    mean, std = (torch.tensor(v).view(1, 3) for v in MEAN_STD[3])
    rgb = images.float().mean(dim=(2, 3))
    if images.is_floating_point():  # the model's input: undo the normalization
        rgb = (rgb * std + mean) * 255
    table = torch.tensor([colour(i) for i in range(N_IMAGES)], dtype=torch.float32)
    return torch.cdist(rgb, table).argmin(dim=1).tolist()
