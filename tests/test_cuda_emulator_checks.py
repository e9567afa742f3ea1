"""The CUDA emulator's own checks (tools/cuda_emulator/README.md lists them): for each, a
planted kernel with exactly that bug (tools/cuda_emulator/planted_bugs.cpp) must raise that
check's error in every emulator mode, and its bug-free twins, the same pattern done right,
must give exact results in every mode, so the checks fire on the bugs, not on the patterns.

Builds only the planted kernels on the emulator (not csrc/cuda, not se_kernels' extension);
needs the CUDA toolkit's headers, not a GPU."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from cuda_emulator.build import ALL_MODES, DEFAULT_MODE, Mode, load_checks, load_or_skip, set_mode

X = torch.arange(4096, dtype=torch.float32)  # every planted kernel's input


@pytest.fixture(scope="module")
def emu():
    ops = load_or_skip(load_checks)
    yield ops
    set_mode(ops, DEFAULT_MODE, 0)


def warp_sums(threads: int) -> torch.Tensor:
    """Every lane: the sum of its warp's inputs."""
    return X[:threads].view(-1, 32).sum(dim=1, keepdim=True).expand(-1, 32).reshape(-1)


def lanes_xor(lane_mask: int, lanes: int = 32) -> torch.Tensor:
    """For 256 threads: the input of lane (lane ^ lane_mask) for lanes below `lanes`, the
    thread's own input for the others."""
    t = torch.arange(256)
    return torch.where(t % 32 < lanes, X[t ^ lane_mask], X[t])


# A twin: the planted kernel's name, and the part of its output it must give exactly.
Twin = tuple[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]
WARP_SUM: Twin = ("warp_sum", lambda out: (out[:256], warp_sums(256)))
NEIGHBOUR_READ: Twin = ("neighbour_read", lambda out: (out[:256], X[:256].roll(-1)))
HALF_WARP: Twin = ("half_warp_shuffle", lambda out: (out[:256], lanes_xor(8, lanes=16)))
VECTOR_COPY: Twin = ("vector_copy", lambda out: (out[:1024], X[:1024]))


@dataclass(frozen=True)
class Check:
    bug: str                       # the planted kernel with exactly this bug
    error: str                     # the check's message, a regular expression
    twins: tuple[Twin, ...] = ()
    snapshot_only: bool = False    # a check of the snapshot modes only


CHECKS = {
    "launch-size": Check(
        "too_many_threads",
        r"a launch of 2048 threads per CTA and 1 CTAs; a GPU takes 1 to 1024 threads per CTA",
        (("warp_sum_1024_threads", lambda out: (out[:1024], warp_sums(1024))),)),
    "shuffle-caller-outside-mask": Check(
        "shuffle_outside_own_mask", r"thread \d+ of CTA 0 calls the shuffle at .*planted_bugs"
        r"\.cpp:\d+ but is not in its mask 0xffff", (HALF_WARP,)),
    "shuffle-lane-missing-from-cta": Check(
        "warp_sum_partial_warp", r"names lane 16 in its mask, which this CTA of 16 threads does "
        r"not have", (WARP_SUM,)),
    "shuffle-lane-exited": Check(
        "warp_sum_lane_exits", r"the shuffle at .* mask 0xffffffff\) needs lane 31, which has "
        r"exited", (WARP_SUM, ("warp_sum_down", lambda out: (out[:256:32], warp_sums(256)[::32])))),
    "shuffle-lane-at-barrier": Check(
        "shuffle_with_lane_at_barrier", r"needs lane 31, which waits at __syncthreads\(\) at "
        r".*planted_bugs\.cpp:\d+",
        (("shuffle_then_barrier", lambda out: (out[:256], X[:256] + lanes_xor(1))),)),
    "shuffle-lanes-at-different-shuffles": Check(
        "divergent_shuffles", r"lanes of one warp at different shuffles: thread \d+ of CTA 0 at "
        r".*planted_bugs\.cpp:\d+, thread \d+ of CTA 0 at .*planted_bugs\.cpp:\d+", (WARP_SUM,)),
    "shuffle-source-outside-mask": Check(
        "half_warp_reads_other_half", r"reads lane 16, outside its mask 0xffff", (HALF_WARP,)),
    "barrier-at-different-lines": Check(
        "divergent_barrier", r"threads of a CTA wait at different __syncthreads\(\): thread \d+ "
        r"of CTA 0 at .*planted_bugs\.cpp:\d+ \(barrier #1\)", (NEIGHBOUR_READ,)),
    "shared-race": Check(
        "racing_writes", r"threads \d+ and \d+ of CTA 0 both wrote byte 0 of the shared array "
        r"declared at .*planted_bugs\.cpp:\d+ between two barriers \(a race\)",
        (NEIGHBOUR_READ,), snapshot_only=True),
    "shared-guard": Check(
        "shared_overflow", r"a thread of CTA 0 wrote past the end of the shared array declared "
        r"at .*planted_bugs\.cpp:\d+ \(1024 bytes\)", (NEIGHBOUR_READ,)),
    "shared-size": Check(
        "shared_64k", r"CTA 0 declares 65536 bytes of shared memory, more than the 49152 static "
        r"shared memory allows", (("shared_48k", lambda out: (out[:256], X.flip(0)[:256])),)),
    "vector-alignment": Check(
        "vector_copy_misaligned", r"misaligned 16-byte load by thread \d+ of CTA 0 at byte \d+ "
        r"of 'in' \(16384 bytes\): address % 16 = 4", (VECTOR_COPY,)),
    "vector-bounds": Check(
        "vector_copy_past_end", r"16-byte load by thread 255 of CTA 0 at .* runs outside the "
        r"buffer", (VECTOR_COPY,)),
    "ldg-of-launch-writes": Check(
        "ldg_of_own_output", r"__ldg read byte \d+ of 'out' \(16384 bytes\), which the same "
        r"launch writes",
        (("ldcg_of_own_output",
          lambda out: (out[:2048], torch.cat([X[:1024], X[:1024].roll(-4)]))),)),
    "atomic-without-fence": Check(
        "last_cta_sum_no_fence", r"thread 0 of CTA \d+ calls atomicAdd on global memory without "
        r"a __threadfence\(\) before it",
        (("last_cta_sum", lambda out: (out[:1], X.sum().reshape(1))),
         ("shared_counter", lambda out: (out[:1], torch.tensor([256.0]))))),  # shared: no fence
    "spin-without-progress": Check(
        "spin_forever", r"thread 0 of CTA [01] spins on a counter that no resident CTA will "
        r"advance"),
}


def modes_of(check: Check) -> list[Mode]:
    return [mode for mode in ALL_MODES if mode.snapshot or not check.snapshot_only]


@pytest.mark.parametrize("name", CHECKS)
def test_check_catches_its_bug(emu, name):
    """The planted bug raises the check's error in every mode (each seeded differently)."""
    check = CHECKS[name]
    for seed, mode in enumerate(modes_of(check)):
        set_mode(emu, mode, seed)
        with pytest.raises(RuntimeError, match=check.error):
            emu.planted(check.bug)


@pytest.mark.parametrize("name", [name for name, check in CHECKS.items() if check.twins])
def test_twins_pass(emu, name):
    """The bug-free twins give exact results in every mode."""
    for seed, mode in enumerate(ALL_MODES):
        set_mode(emu, mode, seed)
        for twin, expected in CHECKS[name].twins:
            got, want = expected(emu.planted(twin))
            assert torch.equal(got, want), f"{twin} in mode {mode}"


def test_races_show_only_in_snapshot_modes(emu):
    """Without the snapshot, threads see each other's shared-memory writes at once: the race
    goes unreported and the last writer wins (which one depends on the order)."""
    for seed, mode in enumerate(m for m in ALL_MODES if not m.snapshot):
        set_mode(emu, mode, seed)
        out = emu.planted("racing_writes")[:256]
        assert (out == out[0]).all() and 0 <= out[0].item() < 256, mode


def test_spin_on_a_cta_not_yet_resident(emu):
    """CTA 1 waits for CTA 0: fine where CTA 0 starts first or runs beside it (random CTA
    order keeps 4 resident), reported as a wait without progress where CTA 1 starts first
    with one CTA resident (reverse order), as it would hang on a GPU with one free SM."""
    for seed, mode in enumerate(ALL_MODES):
        set_mode(emu, mode, seed)
        if mode.ctas == "reverse":
            with pytest.raises(RuntimeError, match="thread 0 of CTA 1 spins on a counter that no "
                                                   "resident CTA will advance"):
                emu.planted("wait_for_cta0")
        else:
            assert emu.planted("wait_for_cta0")[:2].tolist() == [1.0, 2.0], mode


def test_shared_memory_starts_as_nan(emu):
    """Shared memory nobody wrote yet reads as NaN: a read before the barrier that orders it
    (at least one thread reads before its neighbour wrote, in every mode) and a CTA reading
    what only CTA 0 wrote into its own shared memory."""
    for seed, mode in enumerate(ALL_MODES):
        set_mode(emu, mode, seed)
        assert emu.planted("neighbour_read_no_barrier")[:256].isnan().any(), mode
        out = emu.planted("shared_from_another_cta")
        assert torch.equal(out[:256], X[:256]) and out[256:].isnan().all(), mode


def test_modes_are_checked(emu):
    with pytest.raises(RuntimeError, match="resident CTAs must be at least 1, got 0"):
        emu.set_mode("forward", "forward", 0, 0, False)
    with pytest.raises(RuntimeError, match="an order is forward, reverse or random, got "
                                           "'sideways'"):
        emu.set_mode("sideways", "forward", 1, 0, False)
    with pytest.raises(RuntimeError, match="no planted kernel named 'nothing'"):
        emu.planted("nothing")


def test_every_planted_kernel_is_exercised(emu):
    used = {check.bug for check in CHECKS.values()}
    used |= {twin for check in CHECKS.values() for twin, _ in check.twins}
    used |= {"wait_for_cta0", "neighbour_read_no_barrier", "shared_from_another_cta"}
    assert used == set(emu.planted_names())
