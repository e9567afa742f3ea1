"""se_kernels.plan: decoding a schedule trace, the DRAM model, the floor, and the command."""

from __future__ import annotations

import json

import pytest
import torch

from se_kernels import cli, plan
from se_kernels import schedule
from se_kernels.backends import native
from se_kernels.schedule import CUDA_TRACE_KERNELS, TRACE_TENSORS

MB = 10**6
L2 = 60 * MB  # the h200 profile's
H100 = {"name": "NVIDIA H100 80GB HBM3", "multi_processor_count": 132, "L2_cache_size": 50 * 2**20}


def encode(*launches) -> list[int]:
    """The cuda_schedule encoding of launches given as (kernel, ctas, [(tensor, offset,
    nbytes, write), ...])."""
    codes = []
    for kernel, ctas, accesses in launches:
        codes += [CUDA_TRACE_KERNELS.index(kernel), ctas, len(accesses)]
        for tensor, offset, nbytes, write in accesses:
            codes += [TRACE_TENSORS.index(tensor), offset, nbytes, int(write)]
    return codes


def test_decode_round_trip():
    codes = encode(("reduce", 264, [("x", 0, 40 * MB, False), ("scratch", 0, 4096, True)]),
                   ("map", 132, [("x", 0, 40 * MB, False), ("out", 0, 40 * MB, True)]))
    trace = schedule.decode_cuda_trace(codes)
    assert [(launch.kernel, launch.programs) for launch in trace] == [("reduce", 264), ("map", 132)]
    assert trace[0].accesses == [schedule.Access("x", 0, 40 * MB, False),
                                 schedule.Access("scratch", 0, 4096, True)]
    assert trace[1].accesses[1] == schedule.Access("out", 0, 40 * MB, True)


@pytest.mark.parametrize("codes", [[3, 10, 2, 0, 0, 8, 0], [99, 1, 0], [3, 1, 1, 42, 0, 8, 0]])
def test_decode_rejects_malformed(codes):
    with pytest.raises(ValueError, match="malformed"):
        schedule.decode_cuda_trace(codes)


def dram(*launches) -> int:
    """Modeled DRAM bytes of the launches, every tensor."""
    return sum(plan.dram_bytes_by_tensor(schedule.decode_cuda_trace(encode(*launches)), L2).values())


@pytest.mark.parametrize("size, expected", [
    (40 * MB, 80 * MB),  # 80 MB touched from the first read through the second
    (20 * MB, 40 * MB),  # 40 MB > 30 MB
    (15 * MB + 1, 30 * MB + 2),
    (15 * MB, 15 * MB),  # exactly half the L2: a hit
    (14 * MB, 14 * MB),
])
def test_back_to_back_reread_hits_only_within_half_the_l2(size, expected):
    read = ("reduce", 1, [("x", 0, size, False)])
    assert dram(read, read) == expected


def test_writes_always_cost_dram():
    write = ("map", 1, [("out", 0, MB, True)])
    assert dram(write, write) == 2 * MB


def test_reading_what_was_written_hits():
    assert dram(("map", 1, [("scratch", 0, MB, True)]),
                ("mlp", 1, [("scratch", 0, MB, False)])) == MB


def test_contained_reread_hits_and_overlap_does_not():
    first = ("reduce", 1, [("x", 0, 4 * MB, False)])
    inside = ("map", 1, [("x", MB, 2 * MB, False)])
    straddling = ("map", 1, [("x", 3 * MB, 2 * MB, False)])
    assert dram(first, inside) == 4 * MB
    assert dram(first, straddling) == 6 * MB


def test_window_counts_every_tensor_and_the_rereading_access():
    # x (10 MB), then 15 MB of residual, then x again: 35 MB touched > 30 MB.
    assert dram(("reduce", 1, [("x", 0, 10 * MB, False)]),
                ("map", 1, [("residual", 0, 15 * MB, False), ("x", 0, 10 * MB, False)])) == 35 * MB
    # With 5 MB of residual: 25 MB, a hit; accesses after the re-read do not count.
    assert dram(("reduce", 1, [("x", 0, 10 * MB, False)]),
                ("map", 1, [("residual", 0, 5 * MB, False), ("x", 0, 10 * MB, False),
                            ("out", 0, 40 * MB, True)])) == 55 * MB


def test_tensors_do_not_alias():
    assert dram(("reduce", 1, [("x", 0, MB, False)]),
                ("reduce", 1, [("grad_out", 0, MB, False)])) == 2 * MB


def test_floor_and_prediction():
    call = plan.PlanCall(n=2, c=8, h=4, w=4, squeeze=2, dtype=torch.bfloat16, channels_last=True,
                         residual=True, out_relu=True)
    x = 2 * 8 * 16 * 2
    assert plan.floor_bytes(call, backward=False) == 3 * x
    assert plan.floor_bytes(call, backward=True) == 5 * x
    plain = plan.PlanCall(2, 8, 4, 4, 2, torch.float32, False, residual=True)
    assert plan.floor_bytes(plain, backward=True) == 3 * 2 * x  # dresidual is grad_out itself
    gpu = plan.GPUS["h200"]
    result = plan.pass_cost(schedule.decode_cuda_trace(encode(
        ("map", 1, [("x", 0, 4300, False)]), ("map", 1, [("out", 0, 4300, True)]))), 8600, gpu)
    assert result == plan.PassCost(2, 8600, 8600, 2 * 2.5 + 8600 / 4.3e12 * 1e6,
                                   8600 / 4.3e12 * 1e6, 0)


def test_tail_floor_counts_the_second_pass():
    """The tail's batch statistics need all of x (backward: all of dy) before any output:
    x twice forward; dy (or the written dshortcut) and x twice backward, out once more
    without a shortcut under the ReLU."""
    x = 2 * 8 * 16 * 2
    for residual, relu, forward, backward in ((True, True, 4, 7), (False, True, 3, 7),
                                              (True, False, 4, 5), (False, False, 3, 5)):
        call = plan.PlanCall(2, 8, 4, 4, 2, torch.bfloat16, True, residual=residual,
                             out_relu=relu, path=plan.TAIL)
        assert plan.floor_bytes(call, backward=False) == forward * x
        assert plan.floor_bytes(call, backward=True) == backward * x
    staged = plan.PlanCall(2, 8, 4, 4, 2, torch.bfloat16, True, residual=True, out_relu=True,
                           path=plan.STAGED)
    assert plan.floor_bytes(staged, backward=False) == 3 * x  # the SE's: staging gives up reuse


def test_weights_and_scratch_count_apart_from_the_floors_tensors():
    """dram_bytes counts the floor's tensors; weights and scratch go to other_dram_bytes,
    yet take their place in the L2 window (here they push x's re-read out of it)."""
    gpu = plan.GPUS["h200"]
    trace = schedule.decode_cuda_trace(encode(
        ("reduce", 1, [("x", 0, 10 * MB, False), ("scratch", 0, MB, True)]),
        ("mlp", 1, [("weights", 0, 2 * MB, False)]),
        ("map", 1, [("x", 0, 10 * MB, False), ("out", 0, 10 * MB, True)])))
    result = plan.pass_cost(trace, 20 * MB, gpu)
    assert (result.dram_bytes, result.other_dram_bytes) == (20 * MB, 3 * MB)
    assert result.predicted_us == pytest.approx(3 * 2.5 + 23 * MB / 4.3e12 * 1e6)
    crowded = schedule.decode_cuda_trace(encode(
        ("reduce", 1, [("x", 0, 10 * MB, False)]), ("mlp", 1, [("weights", 0, 11 * MB, False)]),
        ("map", 1, [("x", 0, 10 * MB, False)])))
    assert plan.pass_cost(crowded, 20 * MB, gpu).dram_bytes == 20 * MB  # 31 MB > 30 MB


def test_plan_command_json_for_triton(capsys):
    assert cli.main(["plan", "--backend", "triton", "--shape", "32,256,56,56", "--dtype", "bf16",
                     "--layout", "channels_last", "--residual", "--out-activation", "relu",
                     "--gpu", "h200", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"forward", "backward"}
    x = 32 * 256 * 56 * 56 * 2
    for name, floor in (("forward", 3 * x), ("backward", 5 * x)):
        half = result[name]
        assert set(half) == {"launches", "dram_bytes", "floor_bytes", "predicted_us", "floor_us",
                             "other_dram_bytes"}
        for key in ("launches", "dram_bytes", "floor_bytes", "other_dram_bytes"):
            assert isinstance(half[key], int), (name, key)
        for key in ("predicted_us", "floor_us"):
            assert isinstance(half[key], float), (name, key)
        assert half["floor_bytes"] == floor
        assert half["dram_bytes"] >= floor and half["launches"] >= 2
        assert half["predicted_us"] > half["floor_us"] == pytest.approx(floor / 4.3e6)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_plan_command_for_the_tail(capsys, backend):
    """`--path tail`: the stream ops' launches, two passes each way; the second read of x
    is in the floor, and the re-read of x from L2 (this x fits) takes the bytes below it."""
    if backend == "cuda" and native.EXTENSION_ERROR is not None:
        pytest.skip(f"no compiled extension: {native.EXTENSION_ERROR}")
    if backend == "triton":
        pytest.importorskip("triton")
    assert cli.main(["plan", "--backend", backend, "--path", "tail", "--shape", "8,256,14,14",
                     "--residual", "--out-activation", "relu", "--gpu", "h100", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    x = 8 * 256 * 14 * 14 * 2
    assert (result["forward"]["floor_bytes"], result["backward"]["floor_bytes"]) == (4 * x, 7 * x)
    for half in result.values():
        assert half["launches"] >= 2
        assert half["floor_bytes"] - 26 * MB <= half["dram_bytes"] < half["floor_bytes"]
    assert cli.main(["plan", "--backend", backend, "--path", "staged", "--shape", "8,256,14,14",
                     "--pool", "max"]) == 0
    assert "schedule of the staged SE" in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_plan_command_for_the_act_tail(capsys, backend):
    """`--path tail --activation silu`: the act tail in training, x read three times forward;
    a residual is refused."""
    if backend == "cuda" and native.EXTENSION_ERROR is not None:
        pytest.skip(f"no compiled extension: {native.EXTENSION_ERROR}")
    if backend == "triton":
        pytest.importorskip("triton")
    shape = ["--shape", "8,240,28,28"]
    assert cli.main(["plan", "--backend", backend, "--path", "tail", *shape, "--activation",
                     "silu", "--gpu", "h100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{backend} schedule of the block tail (BatchNorm in training -> silu "
                          "-> SE) for x 8x240x28x28")
    assert cli.main(["plan", "--backend", backend, "--path", "tail", *shape, "--activation",
                     "silu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    x = 8 * 240 * 28 * 28 * 2
    assert (result["forward"]["floor_bytes"], result["backward"]["floor_bytes"]) == (4 * x, 5 * x)
    assert cli.main(["plan", "--backend", backend, "--path", "tail", *shape, "--activation",
                     "silu", "--residual"]) == 2
    assert "takes no residual and no output activation" in capsys.readouterr().err


def test_plan_command_refuses_a_tail_that_pools_max(capsys):
    assert cli.main(["plan", "--backend", "triton", "--path", "tail", "--shape", "2,8,4,4",
                     "--pool", "max"]) == 2
    assert capsys.readouterr().err == ("se-kernels plan: the block tail squeezes with the mean, "
                                       "not pool 'max'\n")


def test_plan_command_table(capsys):
    assert cli.main(["plan", "--backend", "triton", "--shape", "8,64,14,14", "--layout", "nchw"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["pass", "launches", "DRAM"]
    assert [line.split()[0] for line in lines[2:]] == ["forward", "backward"]


def test_plan_command_rejects_a_bad_shape(capsys):
    with pytest.raises(SystemExit):
        cli.main(["plan", "--backend", "triton", "--shape", "8,64,14"])
    assert "--shape must be N,C,H,W" in capsys.readouterr().err


def test_plan_command_for_cuda(capsys):
    """The cuda backend's plan, decoded from the extension's cuda_schedule op."""
    from se_kernels.backends import native

    if native.EXTENSION_ERROR is not None:
        pytest.skip(f"no compiled extension: {native.EXTENSION_ERROR}")
    call = plan.PlanCall(32, 2048, 7, 7, 128, torch.bfloat16, False, residual=True, out_relu=True)
    trace = plan.trace("cuda", call, plan.GPUS["h200"], backward=False)
    assert trace and all(launch.kernel in CUDA_TRACE_KERNELS and launch.programs > 0 for launch in trace)
    assert {access.tensor for launch in trace for access in launch.accesses} >= {"x", "residual", "out"}
    assert cli.main(["plan", "--backend", "cuda", "--shape", "32,2048,7,7", "--layout", "nchw",
                     "--residual", "--out-activation", "relu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    x = 32 * 2048 * 49 * 2
    assert (result["forward"]["floor_bytes"], result["backward"]["floor_bytes"]) == (3 * x, 5 * x)
    assert result["forward"]["dram_bytes"] >= 3 * x and result["backward"]["dram_bytes"] >= 5 * x


def test_plan_command_says_why_a_plan_cannot_be_made(capsys, monkeypatch):
    def missing():
        raise plan.PlanUnavailable("the loaded extension se_kernels._C has no cuda_schedule op")

    monkeypatch.setattr(native, "cuda_schedule_op", missing)
    assert cli.main(["plan", "--backend", "cuda", "--shape", "2,8,4,4"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("se-kernels plan: the loaded extension se_kernels._C has no "
                            "cuda_schedule op\n")


def test_gpu_profiles():
    """h100 is an H100 SXM as the lent machines report it: its L2 as cudaDevAttrL2CacheSize
    gives it (50 MiB), the copy bandwidth measured there."""
    h100, h200 = plan.GPUS["h100"], plan.GPUS["h200"]
    assert (h100.sm_count, h100.l2_bytes, h100.bandwidth, h100.launch_us) == (132, 52_428_800, 3.0e12, 2.5)
    assert h100.describe() == "h100: 132 SMs, 50 MiB L2, 3 TB/s, 2.5 us per launch"
    assert h200.describe() == "h200: 132 SMs, 60 MB L2, 4.3 TB/s, 2.5 us per launch"


@pytest.mark.parametrize("gpu", ["h100", "h200"])
def test_the_cuda_plan_is_made_for_the_profiles_sms_and_l2(monkeypatch, capsys, gpu):
    """The cuda backend sizes its groups from the device's L2 (the kernels query
    cudaDevAttrL2CacheSize); the plan hands the profile's SM count and L2 to the same code."""
    asked = []

    def schedule(*args):
        asked.append(args[-2:])
        return encode(("map", 264, [("x", 0, 1000, False), ("out", 0, 1000, True)]))

    monkeypatch.setattr(native, "cuda_schedule_op", lambda: schedule)
    assert cli.main(["plan", "--backend", "cuda", "--shape", "2,8,4,4", "--gpu", gpu]) == 0
    profile = plan.GPUS[gpu]
    assert asked == [(profile.sm_count, profile.l2_bytes)] * 2  # forward, backward
    assert profile.describe() in capsys.readouterr().out


def _fake_gpu(monkeypatch, **properties):
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(**properties))


def test_current_gpu_takes_sms_and_l2_from_the_device(monkeypatch):
    _fake_gpu(monkeypatch, **{**H100, "L2_cache_size": 40 * 2**20, "multi_processor_count": 120})
    gpu = plan.current_gpu()
    assert (gpu.sm_count, gpu.l2_bytes) == (120, 40 * 2**20)
    assert (gpu.bandwidth, gpu.launch_us) == (3.0e12, 2.5)  # the h100 profile's
    assert gpu.name == "NVIDIA H100 80GB HBM3 (cuda:0; bandwidth h100 profile)"


def test_current_gpu_measures_the_bandwidth_of_an_unknown_gpu(monkeypatch):
    from se_kernels.bench import timing

    _fake_gpu(monkeypatch, **{**H100, "name": "NVIDIA H100 PCIe", "multi_processor_count": 114})
    monkeypatch.setattr(timing, "copy_bandwidth_gbps", lambda device, quick: 2000.0)
    gpu = plan.current_gpu()
    assert (gpu.sm_count, gpu.bandwidth) == (114, 2.0e12) and "measured" in gpu.name


def test_plan_for_the_current_gpu_needs_one(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["plan", "--backend", "triton", "--shape", "2,8,4,4", "--gpu", "current"]) == 2
    assert capsys.readouterr().err == "se-kernels plan: --gpu current: no CUDA GPU is visible to torch\n"


def test_cuda_stream_schedule_names_the_stream_ops_it_plans():
    """Every stream op has a cuda plan; another name is refused with the list."""
    if native.EXTENSION_ERROR is not None:
        pytest.skip(f"no compiled extension: {native.EXTENSION_ERROR}")
    from se_kernels import _stream_ops
    names = [*_stream_ops.SCHEMAS, *_stream_ops.ACT_SCHEMAS]
    for name in names:
        assert torch.ops.se_kernels.cuda_stream_schedule(name, 2, 8, 9, 2, False, ["x"], 132)
    with pytest.raises(RuntimeError, match=r"cuda_stream_schedule's op is one of the stream ops "
                       rf"\({', '.join(names)}\), got 'stream_nope'"):
        torch.ops.se_kernels.cuda_stream_schedule("stream_nope", 2, 8, 9, 2, False, ["x"], 132)
