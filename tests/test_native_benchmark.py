"""benchmarks/native_throughput.py's counts (issue 29, item 5): the packed steps are the trainer's packs, and
on the documented mix packing pads less and issues less attention work than padding to the longest image."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import native_throughput as nt  # noqa: E402


def test_packed_steps_fill_the_budget_in_data_order():
    lengths = [5, 9, 3, 8, 2, 7, 6, 1, 4, 9]
    packs = nt.packed_steps(lengths, 10, 8)
    assert packs[0] == [0, 2, 4]  # 9 does not fit after 5; 3 and 2 do, then 8 and 7 wait
    for p in packs:
        assert sum(lengths[i] for i in p) <= 10
    seen = [i for p in packs for i in p]
    assert len(seen) == len(set(seen))


def test_packing_beats_padding_on_the_mix():
    sizes = nt.mix_sizes(300)
    for budget in (576, 1024):
        packed, padded = nt.count_budget(sizes, budget, 8 * budget)
        assert packed["way"] == "aimkern packed" and padded["way"] == "aimkern padded to longest"
        assert packed["padding"] < 0.05 < padded["padding"]
        assert packed["work_x"] < padded["work_x"]
        assert packed["work_x"] >= 1.0  # never below the images' minimum


def test_naflex_bucket_per_image_count_is_the_anchor_and_timm_schedule_differs():
    """The issue's NaFlex anchor (2.48x the work, 1.18x the tokens at 576) counts a bucket per image; timm's
    own schedule draws one per batch and fills it with tokens // bucket images, so small buckets hold most
    images: fewer tokens than the images' own and less work."""
    import pytest

    pytest.importorskip("timm.data.naflex_dataset")
    sizes = nt.mix_sizes(600)
    per_image = nt.count_naflex(sizes, 8 * 576, 576, per_image=True)
    timm_way = nt.count_naflex(sizes, 8 * 576, 576)
    assert 2.0 < per_image["work_x"] < 3.2 and 1.0 < per_image["tokens_x"] < 1.35
    assert timm_way["tokens_x"] < 1.0 and timm_way["work_x"] < per_image["work_x"]
