"""Launch heuristics of the Triton kernels: block sizes, warps and splits per shape.

No autotuning: every block size is a function of the shape, computed once per shape
(functools.lru_cache), so a call never waits on a benchmark and CUDA-graph capture sees
the same launches as eager. The reasoning, for H100/A100-class GPUs (retune the constants
of GPU_PROFILE from benchmarks; tests/test_triton_heuristics.py pins the choices they should make):

* The four passes over x are memory-bound. A program loads an 8 KiB tile per operand and
  iteration (tile_bytes: 4096 bf16, 2048 fp32 elements), 16 elements per thread (one or
  two 16-byte vectors; 4 warps for fp32, 8 for bf16). At 32 elements per thread the
  compiled passes needed 100-170 registers (ptxas, sm_80), one program per SM; at 16 they
  leave room for three or more, i.e. ~24 KiB of loads in flight per SM, above the
  ~18 KiB that H100's bandwidth-latency product asks per SM (3.35 TB/s x ~0.7 us / 132).
* Tiles are [channels, pixels]. The contiguous axis (pixels in NCHW, channels in
  channels-last) takes the whole extent rounded up to a power of two when that is at most
  `contiguous_max`: the tile then covers a dense stretch of memory and the padding costs
  lanes, not bytes. Longer extents are cut in the largest power-of-two block that pads
  them by at most 1/16 (3136 = 56*56 pixels: 256, not 1024, which would pad by 31%).
* The reduction passes must still fill the GPU at small N*C (N=1 inference, late stages):
  H*W is split into pieces reduced by separate programs until there are
  `programs_per_sm` programs per SM, keeping at least `min_tiles_per_piece` tiles of work
  per piece; the MLP kernels combine the pieces in order.
* The MLP kernels are small GEMMs (N x C x S) on CUDA cores. A program's register tile
  holds `mlp_tile` fp32 products (half as many fp64). Its output block is kept square-ish
  (samples x features): every program re-reads the weight rows of its features and the
  vectors of its samples, so the L2 traffic goes as 1/block_n + 1/block_m. Blocks shrink
  (the larger side first) until the grid has `programs_per_sm` programs per SM.

The interpreter profile (CPU tensors, TRITON_INTERPRET=1) follows its own cost model:
~2.5 ms per program and per loop iteration, numpy-vectorized inside, so it wants the
fewest, largest programs.
"""

from __future__ import annotations

import functools
import math
import dataclasses
from dataclasses import dataclass

import torch

from .interpreter import kernels_interpreted


@dataclass(frozen=True)
class DeviceProfile:
    sm_count: int
    tile_bytes: int           # bytes of x per tile in the passes over x
    elems_per_thread: int     # tile elements per thread: sets num_warps, bounds registers
    contiguous_max: int       # longest block along the contiguous axis of x
    programs_per_sm: int      # programs wanted per SM (reduction passes, MLP kernels)
    min_tiles_per_piece: int  # least work (in tiles) for one H*W piece of a reduction
    mlp_tile: int             # fp32 products in an MLP program's register tile
    mlp_block_max: int        # longest MLP block along an output axis
    mlp_inner_max: int        # longest MLP block along the reduction
    max_warps: int
    min_row_bytes: int = 128      # smallest row (channels-last) or tile (NCHW) when cutting blocks
    partial_share: float = 1 / 32  # most bytes of partial sums per byte of x
    l2_bytes: int = 50 * 2**20    # the L2 the map passes' walking order plans for

    def __hash__(self) -> int:  # part of every call's plan key: hash the fields once
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash(tuple(self.__dict__[f] for f in self.__dataclass_fields__))


GPU_PROFILE = DeviceProfile(sm_count=132, tile_bytes=8192, elems_per_thread=16,
                            contiguous_max=1024,
                            programs_per_sm=4, min_tiles_per_piece=2, mlp_tile=4096,
                            mlp_block_max=64, mlp_inner_max=128, max_warps=8)
INTERPRETER_PROFILE = DeviceProfile(sm_count=1, tile_bytes=1 << 18, elems_per_thread=1 << 10,
                                    contiguous_max=1 << 14,
                                    programs_per_sm=1, min_tiles_per_piece=1,
                                    mlp_tile=1 << 16, mlp_block_max=1024, mlp_inner_max=1024,
                                    max_warps=4)


@dataclass(frozen=True)
class PassConfig:
    """Launch config of the passes over x: [block_c, block_p] tiles; the reduction passes
    cut H*W into `splits` pieces of `p_per_split` pixels (a multiple of block_p). NCHW map
    passes take flat blocks of `flat_block` elements with `flat_warps` warps (0: tiles)."""
    block_c: int
    block_p: int
    num_warps: int
    splits: int
    p_per_split: int
    flat_block: int = 0
    flat_warps: int = 0


@dataclass(frozen=True)
class MLPConfig:
    """Register tiles [block_n, block_m, block_k] of an MLP kernel: block_n samples and
    block_m output features per program, block_k along the reduction. For the weight
    gradients the output tile is [block_m of C, block_k of S] and block_n samples are summed
    per step."""
    block_n: int
    block_m: int
    block_k: int
    num_warps: int


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _contiguous_block(extent: int, largest: int) -> int:
    """Block along the contiguous axis (see the notes above)."""
    if _pow2(extent) <= largest:
        return _pow2(extent)
    block = largest
    while block > 16 and math.ceil(extent / block) * block > extent * 17 / 16:
        block //= 2
    return block


@functools.lru_cache(maxsize=1024)
def pass_config(n: int, c: int, p: int, channels_last: bool, elem_size: int,
                profile: DeviceProfile) -> PassConfig:
    tile = max(256, profile.tile_bytes // elem_size)
    wanted = profile.programs_per_sm * profile.sm_count
    if channels_last:
        block_c = _contiguous_block(c, min(profile.contiguous_max, tile))
        # Fill the GPU with narrower channel blocks before cutting H*W into pieces (pieces
        # cost partial sums in memory), down to rows of min_row_bytes.
        while (block_c > 1 and n * math.ceil(c / block_c) < wanted
               and block_c * elem_size >= 2 * profile.min_row_bytes):
            block_c //= 2
        block_p = min(_pow2(p), max(1, tile // block_c))
        groups, channels = n, c
    else:
        block_p = _contiguous_block(p, min(profile.contiguous_max, tile))
        block_c = min(_pow2(n * c), max(1, tile // block_p))
        while (block_c > 1 and math.ceil(n * c / block_c) < wanted
               and block_c * block_p * elem_size >= 2 * profile.min_row_bytes):
            block_c //= 2
        groups, channels = 1, n * c
    num_warps = _warps(block_c * block_p, profile)
    base = max(1, groups * math.ceil(channels / block_c))
    # The pieces' partial sums take 4 bytes per piece and channel, against p * elem_size
    # bytes of x per channel: written and read again, they are traffic the floor has not.
    affordable = max(1, int(p * elem_size * profile.partial_share) // 4)
    most = max(1, math.ceil(p / (block_p * profile.min_tiles_per_piece)))
    splits = max(1, min(math.ceil(wanted / base), most, affordable))
    p_per_split = math.ceil(math.ceil(p / splits) / block_p) * block_p
    splits = math.ceil(p / p_per_split)
    # The NCHW map passes walk x as a flat run in blocks of a whole tile.
    flat_block = tile if not channels_last else 0
    return PassConfig(block_c, block_p, num_warps, splits, p_per_split, flat_block,
                      _warps(flat_block, profile) if flat_block else num_warps)


def _warps(elements: int, profile: DeviceProfile) -> int:
    """Warps for a tile of `elements`: elems_per_thread each, within 1..max_warps."""
    return max(1, min(profile.max_warps, elements // (32 * profile.elems_per_thread)))


def map_walks_backwards(samples: int, first: int, second: int, reread: int,
                        profile: DeviceProfile) -> bool:
    """Whether the map pass should walk the samples last to first. Per sample, the reduction
    pass touches `first` bytes, the map pass `second`, of which `reread` are re-reads of the
    reduction's. A re-read hits L2 when at most half the L2 was touched since the first read
    (se_kernels.plan's model). Walking forwards, sample k waits for the reduction's rest
    and the map pass's first k samples: all hit when the call is small, none once the
    reduction alone fills the window. Walking backwards, the last samples hit whatever the
    batch. The MLP's bytes in between are small and left out."""
    window = profile.l2_bytes // 2

    def hits(limit: float, per_sample: int) -> int:
        return max(0, min(samples, math.floor(limit / per_sample) + 1 if limit >= 0 else 0))

    forwards = hits(window - reread - samples * first, max(1, second - first))
    backwards = hits(window - reread - first, first + second)
    return backwards > forwards


def _square_tiles(rows: int, cols: int, inner: int, inner_max: int, acc_size: int,
                  profile: DeviceProfile, programs_per_tile: int = 1) -> tuple[int, int, int]:
    """[block_rows, block_cols] output tiles with a block_inner third axis, within the
    register budget, square-ish, and shrunk (larger side first) to fill the GPU."""
    budget = profile.mlp_tile * 4 // acc_size
    cap = profile.mlp_block_max
    bi = min(_pow2(inner), inner_max, budget)
    br, bc = min(_pow2(rows), cap), min(_pow2(cols), cap)
    while br * bc * bi > budget:
        if br > bc:
            br //= 2
        else:
            bc //= 2
    target = profile.programs_per_sm * profile.sm_count

    def programs():
        return programs_per_tile * math.ceil(rows / br) * math.ceil(cols / bc)

    while programs() < target and (br > 1 or bc > 1):
        if br >= bc and br > 1:
            br //= 2
        else:
            bc //= 2
    return br, bc, bi


@functools.lru_cache(maxsize=1024)
def mlp_config(n: int, m: int, k: int, acc_size: int, profile: DeviceProfile) -> MLPConfig:
    """Per-sample matrix-vector products: n samples, m outputs, a reduction over k."""
    # A long reduction block: fewer dependent iterations of load-then-FMA per program.
    block_n, block_m, block_k = _square_tiles(n, m, k, profile.mlp_inner_max, acc_size, profile)
    return MLPConfig(block_n, block_m, block_k, num_warps=4)


@functools.lru_cache(maxsize=1024)
def weight_grad_config(n: int, c: int, s: int, acc_size: int,
                       profile: DeviceProfile) -> MLPConfig:
    """dW tiles over [C, S]; the batch is the reduction, two programs (dW1, dW2) a tile."""
    # The batch block only sets the loop length; the budget goes to the output tile.
    block_c, block_s, block_n = _square_tiles(c, s, n, 16, acc_size, profile, programs_per_tile=2)
    return MLPConfig(block_n, block_c, block_s, num_warps=4)


@functools.lru_cache(maxsize=16)
def _cuda_profile(index: int) -> DeviceProfile:
    props = torch.cuda.get_device_properties(index)
    return dataclasses.replace(GPU_PROFILE, sm_count=props.multi_processor_count,
                               l2_bytes=getattr(props, "L2_cache_size", GPU_PROFILE.l2_bytes))


def device_profile(device: torch.device) -> DeviceProfile:
    if kernels_interpreted():
        return INTERPRETER_PROFILE
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_profile(index)
