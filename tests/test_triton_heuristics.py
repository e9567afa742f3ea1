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
    if cfg.splits > 1:  # split only as far as needed to fill the GPU
        assert groups * math.ceil(channels / cfg.block_c) * (cfg.splits - 1) < target
    else:  # or because a piece would get too little work
        assert programs >= target or p <= cfg.block_p * profile.min_tiles_per_piece * 2


def test_pass_config_choices():
    gpu = heuristics.GPU_PROFILE
    # NCHW 56x56: 256-pixel blocks pad 3136 by 6%; 1024 would pad it by 31%.
    cfg = heuristics.pass_config(32, 256, 3136, False, 2, gpu)
    assert (cfg.block_p, cfg.block_c, cfg.num_warps) == (256, 16, 8)
    # NCHW 7x7: the whole row, rounded up to 64 pixels, and no split at N=32.
    cfg = heuristics.pass_config(32, 2048, 49, False, 2, gpu)
    assert (cfg.block_p, cfg.block_c, cfg.splits) == (64, 64, 1)
    # channels-last: C is the contiguous axis, whole up to 1024 channels.
    cfg = heuristics.pass_config(32, 2048, 49, True, 2, gpu)
    assert (cfg.block_c, cfg.block_p) == (1024, 4)
    cfg = heuristics.pass_config(32, 672, 196, True, 4, gpu)
    assert (cfg.block_c, cfg.block_p, cfg.num_warps) == (1024, 2, 4)
    # N=1 inference: H*W is split so the grid still fills the GPU.
    cfg = heuristics.pass_config(1, 256, 3136, True, 2, gpu)
    assert cfg.splits > 1
    # Big batches need no split.
    assert heuristics.pass_config(256, 256, 3136, False, 2, gpu).splits == 1


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
