"""The Triton backend's launch heuristics: what the GPU profile chooses for real shapes
(pure Python: no kernels run, triton is not imported)."""

from __future__ import annotations

import math

import pytest

from se_kernels.backends.triton import heuristics

from triton_support import RESNET50_STAGES


def _is_pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


@pytest.mark.parametrize("n", [1, 32, 256])
@pytest.mark.parametrize("c,hw", RESNET50_STAGES + [(3, 224), (16, 112), (960, 7), (37, 5)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("elem_size", [2, 4, 8])
def test_pass_config_invariants(n, c, hw, channels_last, elem_size):
    profile = heuristics.GPU_PROFILE
    p = hw * hw
    cfg = heuristics.pass_config(n, c, p, channels_last, elem_size, profile)
    assert _is_pow2(cfg.block_c) and _is_pow2(cfg.block_p) and cfg.num_warps in (1, 2, 4, 8)
    tile = cfg.block_c * cfg.block_p
    assert tile * elem_size <= profile.tile_bytes
    # 16 elements per thread (fewer only when the tensor is smaller than a tile)
    assert tile <= cfg.num_warps * 32 * profile.elems_per_thread
    # The pieces cover H*W exactly once, each a whole number of tiles.
    assert cfg.p_per_split % cfg.block_p == 0
    assert (cfg.splits - 1) * cfg.p_per_split < p <= cfg.splits * cfg.p_per_split
    groups, channels = (n, c) if channels_last else (1, n * c)
    programs = groups * math.ceil(channels / cfg.block_c) * cfg.splits
    target = profile.programs_per_sm * profile.sm_count
    # The partial sums of the pieces stay a small share of x's bytes.
    assert 4 * cfg.splits <= max(4, p * elem_size * profile.partial_share)
    if cfg.splits > 1:  # split only as far as needed to fill the GPU
        assert groups * math.ceil(channels / cfg.block_c) * (cfg.splits - 1) < target
    else:  # or because a piece would get too little work, or its partial sums cost too much
        assert (programs >= target or p <= cfg.block_p * profile.min_tiles_per_piece * 2
                or 4 * 2 > p * elem_size * profile.partial_share)
    if channels_last and programs < target:  # channel blocks were cut down to short rows first
        assert cfg.block_c * elem_size < 2 * profile.min_row_bytes or cfg.block_c == 1 or \
            cfg.block_c >= c


def test_pass_config_choices():
    gpu = heuristics.GPU_PROFILE
    # NCHW 56x56: 256-pixel blocks pad 3136 by 6%; 1024 would pad it by 31%. 16 rows per
    # tile give 512 programs; 8 rows fill the GPU's 528 without cutting H*W into pieces.
    cfg = heuristics.pass_config(32, 256, 3136, False, 2, gpu)
    assert (cfg.block_p, cfg.block_c, cfg.num_warps, cfg.splits) == (256, 8, 4, 1)
    # NCHW 7x7: the whole row, rounded up to 64 pixels, and no split at N=32.
    cfg = heuristics.pass_config(32, 2048, 49, False, 2, gpu)
    assert (cfg.block_p, cfg.block_c, cfg.splits) == (64, 64, 1)
    # The NCHW map passes take flat runs of a whole tile, 16 elements per thread.
    assert (cfg.flat_block, cfg.flat_warps) == (4096, 8)
    # channels-last: C is the contiguous axis, cut into 128-byte rows until the grid fills
    # the GPU (32 x 2048 channels: 1024 programs of 64 channels), not into pieces of H*W.
    cfg = heuristics.pass_config(32, 2048, 49, True, 2, gpu)
    assert (cfg.block_c, cfg.block_p, cfg.splits, cfg.flat_block) == (64, 64, 1, 0)
    cfg = heuristics.pass_config(32, 672, 196, True, 4, gpu)
    assert (cfg.block_c, cfg.block_p, cfg.num_warps) == (32, 64, 4)
    # N=1 inference: H*W is split so the grid still fills the GPU.
    cfg = heuristics.pass_config(1, 256, 3136, True, 2, gpu)
    assert cfg.block_c == 64 and cfg.splits > 1
    # ...but not into pieces whose partial sums would cost more than 1/32 of x: 7x7 in bf16
    # is 98 bytes a channel, less than 32 partial sums of 4 bytes.
    assert heuristics.pass_config(1, 2048, 49, True, 2, gpu).splits == 1
    # Big batches need no split.
    assert heuristics.pass_config(256, 256, 3136, False, 2, gpu).splits == 1


def test_map_walk_direction():
    """The map pass walks backwards once the reduction pass alone overflows the half of the
    L2 the model allows, and forwards while the whole call re-reads from L2."""
    gpu = heuristics.GPU_PROFILE  # 50 MiB of L2: a 25 MiB window
    mib = 2**20
    # 8 samples of 1 MiB, x read then x + out: 8 + 2 * 7 + 1 = 23 MiB for the last sample.
    assert not heuristics.map_walks_backwards(8, mib, 2 * mib, mib, gpu)
    # 16 samples: forwards, the 16 MiB reduction leaves room for (25 - 16 - 1) / 1 + 1 = 9
    # samples; backwards, (25 - 2) / 3 + 1 = 8. Forwards still.
    assert not heuristics.map_walks_backwards(16, mib, 2 * mib, mib, gpu)
    # 20 samples: forwards 5, backwards 8.
    assert heuristics.map_walks_backwards(20, mib, 2 * mib, mib, gpu)
    # ResNet-50's first SE at N = 256 (1.6 MB a sample): nothing hits forwards.
    sample = 256 * 56 * 56 * 2
    assert heuristics.map_walks_backwards(256, sample, 3 * sample, sample, gpu)


def test_configs_are_cached():
    """A shape seen before costs a dictionary lookup: no search, no benchmark."""
    gpu = heuristics.GPU_PROFILE
    heuristics.pass_config.cache_clear()
    first = heuristics.pass_config(8, 64, 100, True, 2, gpu)
    assert heuristics.pass_config(8, 64, 100, True, 2, gpu) is first
    assert heuristics.pass_config.cache_info().hits == 1


@pytest.mark.parametrize("n,c,s", [(1, 2048, 128), (32, 256, 16), (32, 2048, 128),
                                   (256, 2048, 128), (32, 960, 240), (3, 37, 9), (0, 8, 2)])
@pytest.mark.parametrize("acc_size", [4, 8])
def test_mlp_configs(n, c, s, acc_size):
    gpu = heuristics.GPU_PROFILE
    budget = gpu.mlp_tile * 4 // acc_size
    target = gpu.programs_per_sm * gpu.sm_count
    for rows, m, k in ((n, s, c), (n, c, s)):  # squeeze FC, excite FC (and their backward)
        cfg = heuristics.mlp_config(rows, m, k, acc_size, gpu)
        assert all(map(_is_pow2, (cfg.block_n, cfg.block_m, cfg.block_k)))
        assert cfg.block_n * cfg.block_m * cfg.block_k <= budget
        assert cfg.block_n <= max(1, 2 * rows) and cfg.block_m < 2 * m
        programs = math.ceil(rows / cfg.block_n) * math.ceil(m / cfg.block_m)
        assert programs >= target or cfg.block_n == cfg.block_m == 1  # fills the GPU
    wg = heuristics.weight_grad_config(n, c, s, acc_size, gpu)
    assert wg.block_n * wg.block_m * wg.block_k <= budget
    assert wg.block_n <= 16


def test_mlp_tiles_stay_square():
    """Big batches: samples and features are blocked alike (L2 traffic ~ 1/bn + 1/bm)."""
    cfg = heuristics.mlp_config(256, 128, 2048, 4, heuristics.GPU_PROFILE)
    assert cfg.block_n >= 4 and cfg.block_m >= 4 and cfg.block_k == 128
