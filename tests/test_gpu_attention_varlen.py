"""Varlen attention compiled on a CUDA GPU: bf16 (which Triton's interpreter cannot run), the head dims of
the dense op, and a pack at native-resolution sizes; the same float64 sequence-by-sequence reference."""
import pytest
import torch

from conftest import requires_cuda
from test_attention_varlen import BIG, check_pack

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.mark.parametrize("d", [64, 80, 128, 256])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gpu_bf16_big_pack(d, is_causal):
    check_pack(BIG, torch.bfloat16, is_causal, h=2, d=d, device="cuda")


def test_gpu_fp16_native_sizes():
    """Grids of a 4:3, 3:4, 16:9 and square image at about 576 patches, one causal block a grid row."""
    grids = [(21, 28), (28, 21), (18, 32), (24, 24)]
    pack = dict(lengths=[h * w for h, w in grids], block=[w for _, w in grids], prefix=[0, 100, 300, 576])
    check_pack(pack, torch.float16, True, h=4, d=64, device="cuda")
