"""aimkern.data.packing: images of any size -> PackedImages (patches, cu_seqlens, grid, coords, prefix_len),
the fixed-budget first-fit packer, and the pack's life in a DataLoader."""
import functools

import pytest
import torch

from aimkern.data.packing import PackedImages, first_fit, pack_images, pack_to_budget
from aimkern.reference.patch_embed import patchify
from conftest import requires_cuda

P = 4


def images(*sizes, c=3, dtype=torch.uint8):
    """One (C, H, W) image per (H, W), distinct random values."""
    if dtype == torch.uint8:
        return [torch.randint(0, 256, (c, h, w), dtype=torch.uint8) for h, w in sizes]
    return [torch.randn(c, h, w, dtype=dtype) for h, w in sizes]


def test_pack_layout_matches_each_image_alone():
    ims = images((8, 12), (4, 4), (16, 8))
    pack = pack_images(ims, P)
    assert pack.patches.dtype == torch.uint8 and pack.patches.shape == (6 + 1 + 8, P * P * 3)
    assert pack.cu_seqlens.dtype == torch.int32 and pack.cu_seqlens.tolist() == [0, 6, 7, 15]
    assert pack.grid.tolist() == [[2, 3], [1, 1], [4, 2]]
    assert pack.prefix_len is None and pack.max_seqlen == 8 and pack.num_images == 3 and pack.patch_size == P
    for s, im in enumerate(ims):
        a, b = pack.cu_seqlens[s].item(), pack.cu_seqlens[s + 1].item()
        # MAE / AIM order: the pixel loss's targets are patchify(..., "pqc") of the image
        assert torch.equal(pack.patches[a:b], patchify(im[None], P, order="pqc")[0])
        h, w = pack.grid[s].tolist()
        rows, cols = pack.coords[a:b].unbind(1)
        assert rows.tolist() == [r for r in range(h) for _ in range(w)]
        assert cols.tolist() == [c for _ in range(h) for c in range(w)]
    # one patch by hand: image 0, patch (row 1, col 2) holds pixels [4:8, 8:12], values ordered (p, q, c)
    assert torch.equal(pack.patches[1 * 3 + 2], ims[0][:, 4:8, 8:12].permute(1, 2, 0).reshape(-1))


def test_float_images_and_prefixes():
    ims = images((4, 8), (8, 8), dtype=torch.float32)
    pack = pack_images(ims, P, prefix_len=[0, 4])
    assert pack.patches.dtype == torch.float32
    assert pack.prefix_len.dtype == torch.int32 and pack.prefix_len.tolist() == [0, 4]
    assert pack_images(ims, P, prefix_len=2).prefix_len.tolist() == [2, 2]
    assert pack_images(ims, P, prefix_len=torch.tensor([2, 4])).prefix_len.tolist() == [2, 4]


@pytest.mark.parametrize("bad,match", [
    (lambda: pack_images(images((8, 8), (8, 6)), P), r"images\[1\] is 8 x 6"),
    (lambda: pack_images(images((8, 8), (2, 8)), P), r"images\[1\]"),
    (lambda: pack_images(images((8, 8)) + images((8, 8), c=1), P), r"images\[1\] is 1-channel"),
    (lambda: pack_images([], P), "non-empty"),
    (lambda: pack_images(images((8, 8)), 0), "patch_size"),
    (lambda: pack_images(images((8, 8), (4, 4)), P, prefix_len=[0, 2]), r"prefix_len\[1\] = 2"),
    (lambda: pack_images(images((8, 8)), P, prefix_len=[1, 2]), "2 values for 1 images"),
    (lambda: pack_images(images((8, 8)), P, prefix_len=-1), r"prefix_len\[0\]"),
])
def test_bad_input_names_the_image(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_bad_types():
    with pytest.raises(TypeError, match=r"images\[0\] must be uint8 or floating"):
        pack_images([torch.zeros(3, 4, 4, dtype=torch.int64)], P)
    with pytest.raises(TypeError, match=r"images\[1\] must be a torch.Tensor"):
        pack_images(images((4, 4)) + [None], P)


def test_first_fit_takes_images_in_data_order():
    assert first_fit([5, 4, 3, 2], 9) == [0, 1]
    assert first_fit([5, 6, 3, 2], 9) == [0, 2]  # 6 does not fit after 5; 3 then fills the gap
    assert first_fit([5, 6, 3, 1], 9, max_images=1) == [0]
    with pytest.raises(ValueError, match="image 1 has 10 patches"):
        first_fit([5, 10], 9)


def test_pack_to_budget_pads_to_a_fixed_shape():
    ims = images((8, 8), (8, 16), (4, 8))  # 4, 8, 2 patches
    pack, taken = pack_to_budget(ims, P, 11, prefix_len=[1, 2, 2], sequences=5)
    assert taken == [0, 2]  # 4 + 8 > 11: the 8-patch image waits for the next pack, the 2-patch one fills in
    assert pack.num_tokens == 11 and pack.num_sequences == 5 and pack.num_images == 2
    assert pack.cu_seqlens.tolist() == [0, 4, 6, 11, 11, 11]
    assert pack.grid.tolist() == [[2, 2], [1, 2], [1, 5], [0, 0], [0, 0]]
    assert pack.prefix_len.tolist() == [1, 2, 5, 0, 0]  # the padding sequence: all prefix, no loss target
    assert pack.patches[6:].eq(0).all() and pack.max_seqlen == 5
    assert torch.equal(pack.patches[4:6], patchify(ims[2][None], P, order="pqc")[0])


def test_pack_to_budget_without_prefix_or_padding():
    ims = images((8, 8), (4, 8))
    exact, taken = pack_to_budget(ims, P, 6)
    assert taken == [0, 1] and exact.prefix_len is None and exact.num_sequences == 2
    padded, _ = pack_to_budget(ims, P, 9)
    assert padded.prefix_len.tolist() == [0, 0, 3] and padded.num_images == 2  # 0: no prefix


def test_to_and_cat():
    a = pack_images(images((8, 8), (4, 4)), P, prefix_len=[1, 0])
    b = pack_images(images((4, 12)), P)
    both = PackedImages.cat([a, b])
    assert both.cu_seqlens.tolist() == [0, 4, 5, 8] and both.prefix_len.tolist() == [1, 0, 0]
    assert both.num_images == 3 and both.max_seqlen == 4
    assert torch.equal(both.patches, torch.cat([a.patches, b.patches]))
    moved = both.to("meta")
    assert all(t.device.type == "meta" for t in (moved.patches, moved.cu_seqlens, moved.grid, moved.coords,
                                                  moved.prefix_len))
    assert moved.patches.dtype == torch.uint8 and moved.cu_seqlens.dtype == torch.int32
    padded, _ = pack_to_budget(images((4, 4)), P, 3)
    with pytest.raises(ValueError, match="only the last pack"):
        PackedImages.cat([padded, a])


def test_shape_checks():
    a = pack_images(images((8, 8)), P)
    with pytest.raises(ValueError, match="cu_seqlens must have shape"):
        PackedImages(a.patches, a.cu_seqlens[:1], a.grid, a.coords, None, P, 4, 1)


class _Images(torch.utils.data.Dataset):
    def __init__(self, ims):
        self.ims = ims

    def __len__(self):
        return len(self.ims)

    def __getitem__(self, i):
        return self.ims[i]


def test_dataloader_collation():
    ims = images((8, 8), (4, 12), (12, 4), (4, 4))
    loader = torch.utils.data.DataLoader(_Images(ims), batch_size=3, num_workers=0,
                                         collate_fn=functools.partial(pack_images, patch_size=P))
    first, second = list(loader)
    assert isinstance(first, PackedImages) and first.cu_seqlens.tolist() == [0, 4, 7, 10]
    assert torch.equal(first.patches, pack_images(ims[:3], P).patches) and second.num_images == 1
    # datasets that yield packs: PackedImages.collate lays them end to end
    packs = [pack_images([im], P) for im in ims]
    merged = next(iter(torch.utils.data.DataLoader(_Images(packs), batch_size=4, collate_fn=PackedImages.collate)))
    assert torch.equal(merged.patches, pack_images(ims, P).patches)
    assert merged.cu_seqlens.tolist() == [0, 4, 7, 10, 11]


def test_pin_memory_pins_every_tensor(monkeypatch):
    """What DataLoader(pin_memory=True) calls on a batch with a pin_memory method (torch's own pin_memory
    helper), seen without a GPU through a stand-in for Tensor.pin_memory."""
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(self) or self.clone())
    pack = pack_images(images((8, 8)), P, prefix_len=1)
    out = pin_memory(pack)
    assert isinstance(out, PackedImages) and len(pinned) == 5 and out.patches is not pack.patches


@requires_cuda
@pytest.mark.gpu
def test_gpu_pinned_non_blocking_copy():
    pack = pack_images(images((8, 8), (4, 8)), P, prefix_len=[1, 2]).pin_memory()
    assert pack.patches.is_pinned() and pack.cu_seqlens.is_pinned()
    on_gpu = pack.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert on_gpu.patches.is_cuda and torch.equal(on_gpu.patches.cpu(), pack.patches)


def test_dataloader_worker_hands_over_the_pack():
    ims = images((8, 8), (4, 12), (12, 4))
    loader = torch.utils.data.DataLoader(_Images(ims), batch_size=3, num_workers=1,
                                         collate_fn=functools.partial(pack_images, patch_size=P))
    (pack,) = list(loader)
    assert isinstance(pack, PackedImages) and pack.max_seqlen == 4
    assert torch.equal(pack.patches, pack_images(ims, P).patches) and pack.cu_seqlens.tolist() == [0, 4, 7, 10]


def test_patches_are_written_into_shared_memory_in_a_worker(monkeypatch):
    """Inside a DataLoader worker the patches go straight into shared memory (handing the pack to the main
    process then copies nothing), as torch's default_collate does for stacked batches."""
    ims = images((8, 8), (4, 4))
    outside = pack_images(ims, P)
    assert not outside.patches.is_shared()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    inside = pack_images(ims, P)
    assert inside.patches.is_shared() and torch.equal(inside.patches, outside.patches)
