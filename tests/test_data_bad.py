"""One bad-sample rule for every source: the ImageFolder reader replaces a file that fails to decode by the
same seeded draw as the shard reader, reports the same ``BadRecord``, and lets a programming error through."""
import pytest

from data_helpers import make_folder

pytest.importorskip("torchvision")

from aimkern.data.bad import BadRecord, replacement  # noqa: E402
from aimkern.data.folder import SeededImages, image_folder_transform  # noqa: E402
from aimkern.data.sources import BatchStream, make_stream  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from torchvision.datasets import ImageFolder

    root = make_folder(tmp_path_factory.mktemp("folder"), n=8, extras=True)  # + gray.png and corrupt.jpg
    return ImageFolder(root, transform=image_folder_transform(16, 3))


def test_folder_replaces_a_bad_file_by_the_seeded_draw(folder):
    images = SeededImages(folder)
    broken = next(i for i, (path, _) in enumerate(folder.samples) if path.endswith("corrupt.jpg"))
    seed = next(s for s in range(100) if replacement(s, 1, len(folder)) != broken)
    image, records = images[(broken, seed)]
    (record,) = records
    assert isinstance(record, BadRecord) and record.sample == folder.samples[broken][0]
    assert record.error in ("OSError", "UnidentifiedImageError") and record.message  # PIL: a cut JPEG
    expected, none = images[(replacement(seed, 1, len(folder)), seed)]  # the draw, with the failing seed
    assert none == [] and (image == expected).all()
    assert images[(broken, seed)][0].equal(image)  # the same in every call


def test_a_programming_error_is_not_a_bad_sample(folder):
    from torchvision.datasets import ImageFolder

    def buggy(image):
        raise TypeError("a bug in a transform")

    with pytest.raises(TypeError, match="a bug"):
        SeededImages(ImageFolder(folder.root, transform=buggy))[(0, 1)]


def test_every_source_is_a_batch_stream(folder, tmp_path):
    import torch

    kw = dict(img_size=16, in_chans=3, global_batch=4, rank=0, world=1, seed=0, start=0, device=torch.device("cpu"))
    for data in ("digits", "synthetic", folder.root):
        stream = make_stream(data, **kw)
        assert isinstance(stream, BatchStream) and next(iter(stream)).shape == (4, 3, 16, 16)
        assert isinstance(stream.take_bad(), list) and (stream.num_samples or 0) > 0
