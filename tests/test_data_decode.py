"""The one CPU decoder (aimkern.data.decode, jpeg, resize), uint8 batches, and normalization on the device.

- A DCT-scaled libjpeg-turbo decode stays within a mean of 3 grey levels (of 255) of full-decode-then-resize
  (PIL, an independent decoder and resampler); the full-size path within 1.5 (resampling round-off only).
- PNG / grayscale / CMYK JPEGs fall back to PIL and give the same crops as their RGB pixels would.
- Every image stream yields uint8 (B, 3, S, S) batches, the same whatever the workers and the start.
- ``model_input`` (normalization on the device, in the step) equals the old CPU float path to round-off,
  and so does the loss of a training step on the same images.
- The evaluation transform goes through the same decoder and matches torchvision's Resize + CenterCrop.
Every image is made here; nothing downloads.
"""
import io

import numpy as np
import pytest
import torch

from data_helpers import make_folder, pack_folder

pytest.importorskip("simplejpeg")
pytest.importorskip("torchvision")
pytest.importorskip("webdataset")

from aimkern.data import jpeg  # noqa: E402
from aimkern.data.decode import MEAN_STD, augmentation, center_view, decode_crop, decode_view  # noqa: E402
from aimkern.data.inputs import ModelInputs, model_input  # noqa: E402
from aimkern.data.resize import crop_resize  # noqa: E402

CPU = torch.device("cpu")
# Mean |scaled - full| in grey levels (0..255) a DCT-scaled decode may be from full-decode-then-resize (PIL):
# the DCT scale block-averages where the resize filters, and the box is cut at the scaled image's pixels.
SCALED_TOLERANCE = 3.0
# The same at full size: two decoders (libjpeg-turbo through simplejpeg and through Pillow) and two bicubic
# resamplers (torch's uint8 kernel and PIL's) differ by round-off only.
FULL_TOLERANCE = 1.5


def photo(width, height, seed=0, quality=90, mode="RGB", fmt="JPEG"):
    """Photo-like bytes (a smooth random field + sensor-like noise, as benchmarks/data_throughput.py)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = (np.asarray(coarse, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))).clip(0, 255)
    im = Image.fromarray(pixels.astype(np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def pil_reference(data, img_size, seed, mode="RGB"):
    """Full decode (PIL), then the crop box resized (PIL bicubic), then the flip: uint8 (C, S, S)."""
    from PIL import Image

    im = Image.open(io.BytesIO(data)).convert(mode)
    box, flip = augmentation(*im.size, seed)
    out = im.resize((img_size, img_size), Image.BICUBIC, box=box)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.array(out)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def mean_abs(a, b):
    return (a.float() - b.float()).abs().mean().item()


# ------------------------------------------------------------------------------------------------------
def test_dct_denominator_is_the_smallest_scale_that_covers_the_output():
    assert jpeg.dct_denominator(500, 375, 224, 224) == 1  # 375 / 2 < 224
    assert jpeg.dct_denominator(448, 448, 224, 224) == 2
    assert jpeg.dct_denominator(447, 900, 224, 224) == 1  # one pixel short in one direction: no scale
    assert jpeg.dct_denominator(1000, 1000, 224, 224) == 4
    assert jpeg.dct_denominator(4000, 3000, 224, 224) == 8  # 1/8 is the smallest libjpeg scale
    with pytest.raises(ValueError, match="box_w"):
        jpeg.dct_denominator(0, 10, 4, 4)
    with pytest.raises(ValueError, match="out_w"):
        jpeg.dct_denominator(10, 10, 0, 4)
    with pytest.raises(ValueError, match="denominator"):
        jpeg.decode(photo(64, 48), False, 3)


def test_scaled_decode_decodes_at_the_scale_and_stays_within_tolerance_of_a_full_decode():
    data = photo(1024, 768)
    assert jpeg.jpeg_size(data) == (1024, 768)
    assert jpeg.decode(data, False, 4).shape == (192, 256, 3)  # libjpeg's 1/4 scale, not a resize
    assert jpeg.decode(data, True, 8).shape == (96, 128, 1)
    scaled_seeds = 0
    for seed in range(6):
        box, _ = augmentation(1024, 768, seed)
        scaled_seeds += jpeg.dct_denominator(box[2] - box[0], box[3] - box[1], 112, 112) > 1
        reference = pil_reference(data, 112, seed)
        fast, full = decode_crop(data, 112, 3, seed), decode_crop(data, 112, 3, seed, draft=False)
        assert fast.shape == full.shape == (3, 112, 112) and fast.dtype == torch.uint8
        assert mean_abs(full, reference) < FULL_TOLERANCE, seed
        assert mean_abs(fast, reference) < SCALED_TOLERANCE, seed
        assert torch.equal(fast, decode_crop(data, 112, 3, seed))  # a pure function of the bytes and seed
    assert scaled_seeds >= 3  # the test exercised DCT scales, not only full-size decodes


def test_png_gray_and_cmyk_fall_back_to_pil_with_the_same_crop():
    from PIL import Image

    rgb_jpeg = photo(160, 120, quality=95)
    pixels = np.array(Image.open(io.BytesIO(rgb_jpeg)).convert("RGB"))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    png = buf.getvalue()
    for seed in range(3):
        box, flip = augmentation(160, 120, seed)
        expected = crop_resize(pixels, tuple(int(v) for v in box), 48, flip)
        assert torch.equal(decode_crop(png, 48, 3, seed), expected)  # PIL's pixels, the one resampler
    gray = decode_crop(photo(160, 120, mode="L"), 48, 1, 0)
    assert gray.shape == (1, 48, 48) and gray.dtype == torch.uint8
    # libjpeg-turbo's own gray output (the Y channel) is PIL's convert("L") of the RGB, to round-off
    gray_full = decode_crop(rgb_jpeg, 48, 1, 0, draft=False)
    assert mean_abs(gray_full, pil_reference(rgb_jpeg, 48, 0, mode="L")) < FULL_TOLERANCE
    cmyk = photo(160, 120, mode="CMYK")  # libjpeg-turbo does not convert CMYK to RGB: PIL does
    assert decode_crop(cmyk, 48, 3, 0).shape == (3, 48, 48)
    with pytest.raises(OSError):  # neither decoder reads it: PIL's error, the bad-sample signal
        decode_crop(b"\xff\xd8\xff\xe0 not a jpeg", 48, 3, 0)


def test_crop_resize_checks_its_arguments():
    pixels = np.zeros((10, 12, 3), np.uint8)
    with pytest.raises(TypeError, match="pixels"):
        crop_resize(pixels.astype(np.float32), (0, 0, 4, 4), 4, False)
    with pytest.raises(ValueError, match="box"):
        crop_resize(pixels, (0, 0, 13, 4), 4, False)
    with pytest.raises(ValueError, match="size"):
        crop_resize(pixels, (0, 0, 4, 4), 0, False)
    with pytest.raises(ValueError, match="in_chans"):
        decode_crop(photo(32, 32), 8, 2, 0)


# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder"))  # 24 JPEGs


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_streams_yield_uint8_batches_that_resume_exactly_whatever_the_workers(folder, tmp_path, kind):
    from aimkern.data.sources import make_stream

    data = folder if kind == "folder" else pack_folder(folder, tmp_path / "shards")

    def first(start, workers):
        return next(iter(make_stream(data, img_size=32, in_chans=3, global_batch=8, rank=0, world=1, seed=0,
                                     start=start, device=CPU, workers=workers)))

    stream = iter(make_stream(data, img_size=32, in_chans=3, global_batch=8, rank=0, world=1, seed=0, start=0,
                              device=CPU, workers=0))
    batches = [next(stream) for _ in range(3)]
    assert batches[0].shape == (8, 3, 32, 32) and batches[0].dtype == torch.uint8
    # channels-last memory: each crop copied as it was decoded; model_input lays it out on the device
    assert batches[0].is_contiguous(memory_format=torch.channels_last)
    assert model_input(batches[0], 3).is_contiguous()
    assert torch.equal(first(16, 2), batches[2]) and torch.equal(first(8, 1), batches[1])
    assert not torch.equal(batches[0], batches[1])


def test_worker_batches_are_stacked_into_shared_memory(folder):
    """A worker's batch reaches the main process without another copy: its storage is shared memory."""
    from aimkern.data.collate import stack_images

    images = [torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(3)]
    assert not stack_images(images).is_shared()  # the main process: plain memory
    loader = torch.utils.data.DataLoader(images, batch_size=3, num_workers=1, collate_fn=stack_images)
    batch = next(iter(loader))
    assert batch.is_shared() and batch.dtype == torch.uint8 and batch[:, 0, 0, 0].tolist() == [0, 1, 2]
    crops = [torch.randint(0, 256, (4, 4, 3), dtype=torch.uint8).permute(2, 0, 1) for _ in range(2)]  # decoder's
    stacked = stack_images(crops)
    assert torch.equal(stacked, torch.stack(crops)) and stacked.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(TypeError, match="uint8"):
        stack_images([torch.zeros(3, 4, 4)])
    with pytest.raises(ValueError, match="images"):  # copy_ would broadcast a 1-channel image: refused
        stack_images([images[0], torch.zeros(1, 4, 4, dtype=torch.uint8)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned batches and the asynchronous copy need CUDA")
def test_cuda_batches_are_pinned_and_copied_asynchronously(folder):
    from aimkern.data.folder import FolderStream

    stream = FolderStream(folder, 32, 3, global_batch=8, rank=0, world=1, seed=0, start=0, workers=1,
                          device=torch.device("cuda"))
    assert stream.loader.pin_memory
    batch = next(iter(stream))
    assert batch.is_cuda and batch.dtype == torch.uint8


# ------------------------------------------------------------------------------------------------------
def old_cpu_float(images: torch.Tensor) -> torch.Tensor:
    """What the CPU did before: torchvision's ToTensor (x / 255) + Normalize(mean, std), per image."""
    from torchvision import transforms as T

    normalize = T.Normalize(*MEAN_STD[3])
    return torch.stack([normalize(img.float() / 255) for img in images])


def test_model_input_equals_the_old_cpu_normalization_to_round_off():
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    new, old = model_input(images, 3), old_cpu_float(images)
    assert new.dtype == torch.float32 and new.shape == old.shape
    torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6)  # float32 round-off (a few ulps)
    last = images.contiguous(memory_format=torch.channels_last)  # the CPU streams' layout: same values
    assert torch.equal(model_input(last, 3), new) and model_input(last, 3).is_contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # inside the step's autocast: still float32, same values
        assert torch.equal(model_input(images, 3), new)
    floats = torch.randn(2, 3, 4, 4)
    assert model_input(floats, 3) is floats  # the in-memory streams' input passes unchanged
    assert [b.dtype for b in ModelInputs([images, floats], 3)] == [torch.float32, torch.float32]
    with pytest.raises(TypeError, match="batch"):
        model_input(images.to(torch.int32), 3)
    with pytest.raises(ValueError, match="batch"):
        model_input(images, 1)


def test_a_training_step_on_uint8_gives_the_loss_of_the_old_cpu_float_path(folder):
    """The same images, once as uint8 (normalized in the step) and once normalized on the CPU as before."""
    from aimkern.data.sources import make_stream
    from aimkern.train import parse_args
    from aimkern.train.step import build_run, train_step

    args = parse_args(["--device", "cpu", "--batch-size", "8", "--img-size", "32", "--data", folder, "--steps", "2"])
    batch = next(iter(make_stream(folder, img_size=32, in_chans=3, global_batch=8, rank=0, world=1, seed=0,
                                  start=0, device=CPU)))
    losses = []
    for images in (batch, old_cpu_float(batch)):
        run = build_run(args)
        losses.append([train_step(run, images, step).loss.item() for step in range(2)])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)


def test_token_ids_are_float32_even_inside_autocast():
    from aimkern.tokenizers import KMeansPatchTokenizer
    from aimkern.train.tokens import encode

    images = model_input(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), 3)
    tok = KMeansPatchTokenizer(vocab_size=8, patch_size=4)
    tok.fit(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = encode(tok, images)
    assert torch.equal(inside, encode(tok, images))


# ------------------------------------------------------------------------------------------------------
def test_the_eval_transform_is_the_same_decoder_and_matches_torchvision():
    from PIL import Image
    from torchvision import transforms as T

    from aimkern.eval.data import CROP_RATIO, eval_transform

    for size in ((320, 240), (240, 320), (300, 300)):
        data = photo(*size, seed=size[0])
        got = eval_transform(64, 3)(data)
        assert torch.equal(got, decode_view(data, center_view(64, CROP_RATIO), 64, 3))
        reference = T.Compose([T.Resize(int(round(64 / CROP_RATIO)), interpolation=T.InterpolationMode.BICUBIC),
                               T.CenterCrop(64), T.PILToTensor()])(Image.open(io.BytesIO(data)).convert("RGB"))
        assert got.shape == reference.shape == (3, 64, 64) and got.dtype == torch.uint8
        assert mean_abs(got, reference) < SCALED_TOLERANCE, size  # 320 px -> 73: a 1/2 DCT scale
    with pytest.raises(ValueError, match="crop_ratio"):
        center_view(64, 0)
