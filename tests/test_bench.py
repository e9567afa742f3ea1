"""se-kernels bench / flops: shapes read from torchvision and timm, floor bytes, FLOP and
parameter counts, and tiny CPU suites end to end (CSV, markdown, PNG, --compare): SE
blocks, block tails, models. Nothing here asserts a speed: only that what was measured is
there, positive and finite."""

from __future__ import annotations

import csv
import importlib.util
import math

import pytest
import torch

pytest.importorskip("torchvision", reason="torchvision is a test extra: pip install .[test]")

from se_kernels import dispatch  # noqa: E402
from se_kernels.bench import block, flops, report, shapes  # noqa: E402
from se_kernels.cli import main  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread while timing: on a busy 2-core machine two threads wait on each
    other's time slices (and `--threads` changes the process's setting: restore it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_resnet50_shapes_are_the_four_stages_at_r16():
    found = [(s.channels, s.squeeze, s.height, s.width, s.count, s.activation, s.gate)
             for s in shapes.network_shapes("resnet50")]
    assert found == [(256, 16, 56, 56, 3, "relu", "sigmoid"), (512, 32, 28, 28, 4, "relu", "sigmoid"),
                     (1024, 64, 14, 14, 6, "relu", "sigmoid"), (2048, 128, 7, 7, 3, "relu", "sigmoid")]


@pytest.mark.parametrize("network, layers, activation, gate", [
    ("mobilenetv3", 8, "relu", "hardsigmoid"),
    ("efficientnet_b0", 16, "silu", "sigmoid"),
    ("regnety_400mf", 16, "relu", "sigmoid"),
])
def test_network_shapes_follow_torchvision(network, layers, activation, gate):
    from torchvision.models._utils import _make_divisible

    found = shapes.network_shapes(network)
    assert sum(s.count for s in found) == layers
    assert len({(s.channels, s.squeeze, s.height, s.width) for s in found}) == len(found)
    for s in found:
        assert (s.activation, s.gate) == (activation, gate)
        assert s.height * 224 // s.height == 224 and 224 % s.height == 0
        if network == "mobilenetv3":
            assert s.squeeze == _make_divisible(s.channels // 4, 8)
    if network == "efficientnet_b0":  # stage 1: 32 channels at 112x112, squeeze 32 // 4
        assert (found[0].channels, found[0].squeeze, found[0].height) == (32, 8, 112)


def test_quick_picks_first_and_last_shape():
    found = shapes.network_shapes("efficientnet_b0")
    assert shapes.evenly_spaced(found, 2) == (found[0], found[-1])
    assert shapes.evenly_spaced(found[:1], 2) == found[:1]


def test_floor_bytes_count_each_tensor_once():
    stage = shapes.network_shapes("resnet50")[0]  # 256 x 56 x 56, S = 16
    act = 8 * 256 * 56 * 56 * 2  # bf16
    weights = (2 * 256 * 16 + 256 + 16) * 2
    fwd = block.floor_bytes(block.Case(stage, 8, "bf16", "nchw", "fwd"))
    bwd = block.floor_bytes(block.Case(stage, 8, "bf16", "nchw", "bwd"))
    both = block.floor_bytes(block.Case(stage, 8, "bf16", "nchw", "fwd+bwd"))
    assert (fwd, bwd, both) == (2 * act + weights, 3 * act + 2 * weights, 5 * act + 3 * weights)


def test_percentile_interpolates():
    from se_kernels.bench.timing import percentile

    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 20) == pytest.approx(1.8)
    assert math.isnan(percentile([], 50))


def _positive(value: str) -> float:
    number = float(value)
    assert math.isfinite(number) and number > 0, value
    return number


def test_bench_cli_end_to_end(tmp_path, capsys):
    """A tiny CPU suite: 2 MobileNetV3 shapes x (fwd, fwd+bwd) x (eager, cpu, torch), with
    --compare against an old CSV that holds one of its rows."""
    old = tmp_path / "old.csv"
    with old.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=report.BLOCK_COLUMNS)
        writer.writeheader()
        writer.writerow({"network": "mobilenetv3", "channels": 72, "squeeze": 24, "height": 28,
                         "width": 28, "batch": 1, "dtype": "fp32", "layout": "nchw",
                         "mode": "fwd", "peer": "eager", "median_us": 1e9})
    out = tmp_path / "results"
    argv = ["bench", "--device", "cpu", "--suite", "mobilenetv3", "--quick", "--batch", "1",
            "--modes", "fwd,fwd+bwd", "--backends", "cpu,torch", "--threads", "1", "--out", str(out),
            "--compare", str(old)]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    csvs = list(out.glob("*.csv"))
    assert len(csvs) == 1 and csvs[0].name.startswith("cpu-")
    stem = csvs[0].with_suffix("")
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = report.read_csv(csvs[0])
    assert list(rows[0]) == report.BLOCK_COLUMNS
    assert len(rows) == 2 * 2 * 3
    assert {r["peer"] for r in rows} == {"eager", "cpu", "torch"}
    assert {(r["channels"], r["mode"]) for r in rows} == {
        ("72", "fwd"), ("72", "fwd+bwd"), ("960", "fwd"), ("960", "fwd+bwd")}
    for r in rows:
        for column in ("median_us", "p20_us", "p80_us", "floor_bytes", "gbps", "pct_copy_bw",
                       "x_eager"):
            _positive(r[column])
        assert float(r["p20_us"]) <= float(r["median_us"]) <= float(r["p80_us"])
        assert r["check"] == "ok", r
        assert r["peak_mib"] == "" and r["x_compile"] == ""  # not measured, never invented
        assert float(r["max_rel_err"]) < 1e-4
    assert all(float(r["x_eager"]) == 1.0 for r in rows if r["peer"] == "eager")

    markdown = stem.with_suffix(".md").read_text()
    assert "- command: `se-kernels bench --device cpu --suite mobilenetv3" in markdown
    for needle in ("torch " + torch.__version__, "se_kernels ", "copy bandwidth", "host malloc: ",
                   "results held for as many calls",
                   "| shape |",
                   f"]({stem.name}.png)", "## Change against old.csv"):
        assert needle in markdown, needle
    assert "old us" in printed and "x faster" in printed
    assert "matched 1 of 12 new rows; 0 rows of the old file are not in this run" in printed
    assert "eager: geometric mean x faster" in printed


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd", "bwd"])
def test_a_step_holds_its_last_results_so_outputs_land_in_cold_memory(mode):
    """With hold=k a step keeps the results of its last k calls alive and frees older ones,
    so the allocator cannot hand a call the block its previous call just wrote; without
    hold every result is freed as soon as the caller drops it."""
    import weakref

    shape = shapes.network_shapes("mobilenetv3")[0]
    case = block.Case(shape, 1, "fp32", "nchw", mode)
    eager = block.peers_mod.eager_module(shape, torch.device("cpu"), torch.float32)
    inputs = block.make_inputs(case, torch.device("cpu"))
    params = list(eager.parameters())
    for hold in (0, 1, 3):
        step = block.make_step(eager, params, inputs, mode, hold=hold)
        alive = [weakref.ref(step()[0]) for _ in range(5)]
        held = [ref() is not None for ref in alive]
        assert held == [False] * (5 - hold) + [True] * hold, (hold, held)


def test_compare_reports_ratio_old_over_new():
    new = [{"network": "n", "channels": 8, "squeeze": 2, "height": 4, "width": 4, "batch": 1,
            "dtype": "fp32", "layout": "nchw", "mode": "fwd", "peer": p, "median_us": t}
           for p, t in (("eager", 10.0), ("cpu", 4.0))]
    old = [{**r, "median_us": str(r["median_us"] * 2)} for r in new][:1]
    text = report.compare(old, new, markdown=True)
    assert "| n | 8 | 2 | 4 | 4 | 1 | fp32 | nchw | fwd | eager | 20.0 | 10.0 | 2.00 |" in text
    assert "eager: geometric mean x faster 2.00 over 1 rows" in text
    assert "matched 1 of 2 new rows" in text


def test_missing_extra_is_a_clear_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit, match=r"needs matplotlib.*pip install 'se-kernels\[bench\]'"):
        main(["bench", "--device", "cpu", "--out", str(tmp_path)])


def test_bad_flags_name_the_flag(tmp_path):
    with pytest.raises(SystemExit, match="--dtype"):
        main(["bench", "--device", "cpu", "--dtype", "fp8", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--backends"):
        main(["bench", "--device", "cpu", "--backends", "cdua", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--threads values must be >= 1"):
        main(["bench", "--device", "cpu", "--threads", "1,0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--batch takes comma-separated integers"):
        main(["bench", "--device", "cpu", "--batch", "one", "--out", str(tmp_path)])


@pytest.mark.slow  # ~10-20 s: Inductor compiles a forward and a backward graph
def test_compiled_peer_replays_its_backward():
    """bwd mode replays the backward on one graph: torch.compile's donated buffers must be
    off for that, and the result must still match eager."""
    shape = shapes.network_shapes("mobilenetv3")[-1]  # 960 x 7 x 7
    refused = {}
    rows = block.run_case(block.Case(shape, 1, "fp32", "nchw", "bwd"), ["compile"],
                          torch.device("cpu"), quick=True, copy_gbps=1.0, refused=refused)
    assert [r["peer"] for r in rows] == ["eager", "compile"] and not refused
    compiled = rows[1]
    assert compiled["check"] == "ok" and compiled["compile_s"] > 0
    assert compiled["x_compile"] == 1.0 and compiled["median_us"] > 0


def test_flop_and_parameter_counts_match_the_formulas():
    import torchvision

    from se_kernels.models import se_resnet50

    plain = flops.count(torchvision.models.resnet50)
    v1 = flops.count(torchvision.models.resnet50, v1_strides=True)
    se = flops.count(se_resnet50)
    assert plain["params"] == 25_557_032 and round(plain["flops"] / 2e9, 2) == 4.09
    # The paper's 3.86 GMACs: v1 strides, plus one op per residual-add element.
    assert round(v1["flops"] / 2e9 + v1["residual_adds"] / 1e9, 2) == 3.86
    stages = flops.se_stages(torchvision.models.resnet50())
    assert stages == [(3, 256), (4, 512), (6, 1024), (3, 2048)]
    weights = 2 / 16 * sum(n * c * c for n, c in stages)
    biases = sum(n * (c + c // 16) for n, c in stages)
    assert se["params"] == plain["params"] + weights + biases
    assert math.ceil(se["params"] / 1e5) / 10 == flops.PAPER_TABLE10_PARAMS_M[16]
    # The SE op's registered formula: pooling, 2 FLOPs per FC multiply-add, scale, residual.
    hw = {256: 56 * 56, 512: 28 * 28, 1024: 14 * 14, 2048: 7 * 7}
    expected = sum(n * (3 * c * hw[c] + 4 * c * (c // 16)) for n, c in stages)
    assert se["by_op"]["se_kernels.se_forward"] == expected
    assert se["by_op"]["aten.convolution"] == plain["by_op"]["aten.convolution"]


def test_model_suite_tiny_training_step():
    pytest.importorskip("timm", reason="timm is a test extra: pip install .[test]")
    from se_kernels.bench import model

    rows = model.run(torch.device("cpu"), batches=[2], images=[32], tasks=["train"], quick=True,
                     backends=["cpu"], compile_models=False, models=["se_resnet50", "seresnet50*"])
    assert [(r["family"], r["model"], r["backend"]) for r in rows] == [
        ("torchvision", "resnet50", ""), ("torchvision", "se_resnet50", "cpu"),
        ("timm", "resnet50", ""), ("timm", "seresnet50", ""),
        ("timm", "seresnet50+convert-se-only", "auto"), ("timm", "seresnet50+convert", "auto")]
    medians = {(r["family"], r["model"]): r["median_ms"] for r in rows}
    for r in rows:
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0
        if r["se"]:
            assert r["time_vs_plain"] > 0 and r["reference_ratio"] == pytest.approx(209 / 190)
            plain = medians[(r["family"], "resnet50")]  # each SE model against its own family's
            assert r["time_vs_plain"] == pytest.approx(r["median_ms"] / plain)


def test_model_suite_pairs_each_se_model_with_its_plain_model():
    """Three timm variants per SE model, each compared with its own plain model; a subset
    chosen by family or by name pattern brings the plain models its SE models need."""
    pytest.importorskip("timm", reason="timm is a test extra: pip install .[test]")
    from se_kernels.bench import model

    found = model.variants(torch.device("cpu"), ["cpu"])
    timm_rows = [(v.model, v.se, v.plain) for v in found if v.family == "timm"]
    assert timm_rows == [
        ("resnet50", False, ""), ("seresnet50", True, "resnet50"),
        ("seresnet50+convert-se-only", True, "resnet50"), ("seresnet50+convert", True, "resnet50"),
        ("resnext50_32x4d", False, ""), ("seresnext50_32x4d", True, "resnext50_32x4d"),
        ("seresnext50_32x4d+convert-se-only", True, "resnext50_32x4d"),
        ("seresnext50_32x4d+convert", True, "resnext50_32x4d")]

    def chosen(families, models):
        return [f"{v.family} {v.model}" for v in model.select(found, families, models)]

    assert chosen(["timm"], ["*+convert"]) == [
        "timm resnet50", "timm seresnet50+convert", "timm resnext50_32x4d",
        "timm seresnext50_32x4d+convert"]
    assert chosen(None, ["seresnext50_32x4d"]) == ["timm resnext50_32x4d", "timm seresnext50_32x4d"]
    assert chosen(["torchvision"], None) == ["torchvision resnet50", "torchvision se_resnet50"]
    assert chosen(["torchvision"], ["seresnet50*"]) == []


def test_model_suite_flags_choose_batches_images_tasks_and_models(tmp_path):
    pytest.importorskip("timm", reason="timm is a test extra: pip install .[test]")
    from se_kernels.bench import runner
    from se_kernels.cli import build_parser

    def plan(*flags):
        args = build_parser().parse_args(["bench", "--device", "cpu", "--out", str(tmp_path),
                                          *flags])
        return runner.make_plan(args, torch.device("cpu"))

    kwargs = plan("--suite", "model", "--model-batch", "8,32", "--image-size", "160,224",
                  "--model-tasks", "train", "--families", "timm", "--models", "seresnet50*").model
    assert (kwargs["batches"], kwargs["images"], kwargs["tasks"]) == ([8, 32], [160, 224], ["train"])
    assert (kwargs["families"], kwargs["models"]) == (["timm"], ["seresnet50*"])
    default = plan("--suite", "model").model  # a full CPU run: batch 8 at 224, both tasks
    assert (default["batches"], default["images"], default["tasks"]) == ([8], [224], ["train", "infer"])
    assert default["families"] is None and default["models"] is None
    with pytest.raises(SystemExit, match="select no model; the models are resnet50, se_resnet50"):
        plan("--suite", "model", "--models", "vgg16")
    with pytest.raises(SystemExit, match="--model-tasks"):
        plan("--suite", "model", "--model-tasks", "fly")
    with pytest.raises(SystemExit, match="--model-batch must be >= 2"):
        plan("--suite", "model", "--model-batch", "1,8")
    assert plan("--suite", "model", "--model-batch", "1", "--model-tasks", "infer").model["batches"] == [1]


def test_tail_shapes_are_the_four_stages_of_both_networks():
    pytest.importorskip("timm", reason="timm is a test extra: pip install .[test]")
    for image, sides in ((224, (56, 28, 14, 7)), (160, (40, 20, 10, 5))):
        found = shapes.tail_shapes(image)
        assert [(s.channels, s.squeeze, s.height, s.width, s.count) for s in found] == [
            (256, 16, sides[0], sides[0], 3), (512, 32, sides[1], sides[1], 4),
            (1024, 64, sides[2], sides[2], 6), (2048, 128, sides[3], sides[3], 3)]
        assert {(s.network, s.activation, s.gate) for s in found} == {
            ("seresnet50/seresnext50_32x4d", "relu", "sigmoid")}


def test_act_tail_shapes_are_efficientnet_b0s_se_inputs():
    pytest.importorskip("timm", reason="timm is a test extra: pip install .[test]")
    found = shapes.act_tail_shapes(224)
    assert [(s.channels, s.squeeze, s.height, s.count) for s in found] == [
        (32, 8, 112, 1), (96, 4, 56, 1), (144, 6, 56, 1), (144, 6, 28, 1), (240, 10, 28, 1),
        (240, 10, 14, 1), (480, 20, 14, 3), (672, 28, 14, 2), (672, 28, 7, 1), (1152, 48, 7, 4)]
    assert {(s.network, s.activation, s.gate, s.norm_activation) for s in found} == {
        ("efficientnet_b0", "silu", "sigmoid", "silu")}


def test_tail_floor_bytes_count_each_tensor_once():
    from se_kernels.bench import tail

    shape = shapes.SEShape("n", "layer1.0", 256, 16, 56, 56, "relu", "sigmoid")
    act = 8 * 256 * 56 * 56 * 4  # fp32
    params = (2 * 256 * 16 + 256 + 16 + 2 * 256) * 4  # the SE's weights and biases, BN's affine
    fwd = tail.floor_bytes(block.Case(shape, 8, "fp32", "nchw", "fwd"))
    both = tail.floor_bytes(block.Case(shape, 8, "fp32", "nchw", "fwd+bwd"))
    assert (fwd, both) == (3 * act + params, 8 * act + 3 * params)
    # An act tail: no shortcut and no ReLU mask; fwd reads x, writes out; bwd reads dout, x
    # and writes dx.
    act_shape = shapes.SEShape("n", "blocks.0.0.se", 256, 16, 56, 56, "silu", "sigmoid",
                               norm_activation="silu")
    fwd = tail.floor_bytes(block.Case(act_shape, 8, "fp32", "nchw", "fwd"))
    both = tail.floor_bytes(block.Case(act_shape, 8, "fp32", "nchw", "fwd+bwd"))
    assert (fwd, both) == (2 * act + params, 5 * act + 3 * params)


def test_tail_suite_end_to_end(tmp_path, capsys):
    """A tiny tail suite: the first and last tail shape of a 64x64 image (C256 16x16 and
    C2048 2x2, so the BatchNorm sees 8 values a channel at batch 2) and the first and last
    act-tail shape (C32 32x32 and C1152 2x2) x (fwd, fwd+bwd) x (eager, se-only, fused),
    with --compare against an old CSV that holds one of its rows."""
    pytest.importorskip("timm", reason="timm is a test extra: pip install .[test]")
    from se_kernels.bench import tail

    old = tmp_path / "old.csv"
    report.write_csv([{"network": "seresnet50/seresnext50_32x4d", "channels": 256, "squeeze": 16,
                       "height": 16, "width": 16, "batch": 2, "dtype": "fp32", "layout": "nchw",
                       "mode": "fwd", "threads": 1, "peer": "fused", "median_us": 1e9,
                       "x_se_only": 1.0}], old, tail.TAIL_COLUMNS)
    out = tmp_path / "results"
    argv = ["bench", "--device", "cpu", "--suite", "tail", "--quick", "--image-size", "64",
            "--batch", "2", "--threads", "1", "--backends", "eager,se-only,fused",
            "--out", str(out), "--compare", str(old)]
    assert main(argv) == 0
    printed = capsys.readouterr().out

    csvs = list(out.glob("*.csv"))
    assert [p.name.endswith("-tail.csv") for p in csvs] == [True]
    rows = report.read_csv(csvs[0])
    assert list(rows[0]) == tail.TAIL_COLUMNS
    assert [(r["channels"], r["height"], r["mode"], r["peer"]) for r in rows] == [
        (c, h, mode, peer) for c, h in (("256", "16"), ("2048", "2"), ("32", "32"), ("1152", "2"))
        for mode in ("fwd", "fwd+bwd") for peer in ("eager", "se-only", "fused")]
    for r in rows:
        assert r["check"] == "ok", r
        assert float(r["max_rel_err"]) < 1e-4
        for column in ("median_us", "p20_us", "p80_us", "floor_bytes", "gbps", "x_eager",
                       "x_se_only"):
            _positive(r[column])
        assert r["runs"] == ("" if r["peer"] == "eager" else "cpu")
        assert r["x_compile"] == "" and r["peak_mib"] == ""
    assert all(float(r["x_se_only"]) == 1.0 for r in rows if r["peer"] == "se-only")
    assert all(float(r["x_eager"]) == 1.0 for r in rows if r["peer"] == "eager")

    stem = csvs[0].with_name(csvs[0].name.removesuffix("-tail.csv"))
    assert csvs[0].with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = stem.with_suffix(".md").read_text()
    for needle in ("- command: `se-kernels bench --device cpu --suite tail", "torch " + torch.__version__,
                   "copy bandwidth", "block tail peers", "GB/s on the tail's floor bytes",
                   "## Block tail: speed-up over eager", "## Block tail: speed-up over SE-only",
                   "| geomean x se only |", "| x se-only |", f"]({stem.name}-tail.png)",
                   "## Change against old.csv"):
        assert needle in markdown, needle
    assert "matched 1 of 24 new rows" in printed


def test_tail_suite_flags(tmp_path):
    pytest.importorskip("timm", reason="timm is a test extra: pip install .[test]")
    from se_kernels.bench import runner
    from se_kernels.cli import build_parser

    def plan(*flags):
        args = build_parser().parse_args(["bench", "--device", "cpu", "--suite", "tail",
                                          "--out", str(tmp_path), *flags])
        return runner.make_plan(args, torch.device("cpu"))

    # both images' four stages and EfficientNet-B0's ten act tails, N 8 and 32, fwd and
    # fwd+bwd, 1 and 2 threads
    full = plan()
    assert not full.cases and not full.model
    assert len(full.tail_cases) == (8 + 20) * 2 * 2 * 2
    assert {(c.batch, c.mode, c.threads, c.dtype) for c in full.tail_cases} == {
        (n, m, t, "fp32") for n in (8, 32) for m in ("fwd", "fwd+bwd") for t in (1, 2)}
    assert {c.shape.height for c in full.tail_cases if c.shape.norm_activation is None} == {
        56, 28, 14, 7, 40, 20, 10, 5}
    assert {c.shape.height for c in full.tail_cases if c.shape.norm_activation} == {
        112, 56, 28, 14, 7, 80, 40, 20, 10, 5}
    assert len(plan("--image-size", "160", "--batch", "32", "--threads", "1").tail_cases) == (4 + 10) * 2
    with pytest.raises(SystemExit, match="--modes"):
        plan("--modes", "bwd")
    with pytest.raises(SystemExit, match="--backends"):
        plan("--backends", "auto")


@pytest.mark.slow  # ~10-20 s: Inductor compiles the tail's forward and backward
def test_tail_compile_peer_agrees_with_eager():
    pytest.importorskip("timm", reason="timm is a test extra: pip install .[test]")
    from se_kernels.bench import tail

    shape = shapes.tail_shapes(64)[-1]  # C2048 2x2
    rows = tail.run_case(block.Case(shape, 2, "fp32", "nchw", "fwd+bwd"), ["compile"],
                         torch.device("cpu"), quick=True, copy_gbps=1.0, refused={})
    assert [r["peer"] for r in rows] == ["eager", "compile"]
    assert rows[1]["check"] == "ok" and rows[1]["compile_s"] > 0 and rows[1]["x_compile"] == 1.0


def test_flops_cli_prints_and_writes_both_tables(tmp_path, capsys, monkeypatch):
    import torchvision

    from se_kernels.models import se_resnet50

    # Table 2 on ResNet-50 and SE-ResNet-50 only (101/152 take longer, same code).
    monkeypatch.setattr(flops, "_builders", lambda: {"resnet50": torchvision.models.resnet50,
                                                     "se_resnet50": se_resnet50})
    target = tmp_path / "flops.md"
    assert main(["flops", "--markdown", str(target)]) == 0
    printed = capsys.readouterr().out
    written = target.read_text()
    assert "## Table 2" in written and "## Table 10" in written
    # ResNet-50 v1.5 / v1 strides / v1 + residual adds / paper, then SE-ResNet-50's row.
    assert "| resnet50 | 25.56 | 25.6 | 4.09 | 3.86 | 3.86 | 3.86 | - |" in written
    assert "| se_resnet50 | 28.09 | 28.1 | 4.10 | 3.87 | 3.87 | 3.87 | 21.59 |" in written
    for r, paper in flops.PAPER_TABLE10_PARAMS_M.items():
        assert f"| {r} |" in written and f"| {paper:.1f} | {paper:.1f} |" in written
    assert "sum N_s*C_s^2 = 20,119,552" in printed


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward doubles the gradient (a wrong backward)."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class _FaultyBackend(dispatch.Backend):
    """A backend that is wrong on purpose: its output, its gradients, or it raises."""

    def __init__(self, fault: str):
        self.name = f"faulty-{fault}"
        self.fault = fault

    def refusals(self, call):
        return []

    def run(self, call):
        from se_kernels.backends.torch_backend import torch_forward

        out = torch_forward(call)
        if self.fault == "output":
            return out * 1.01
        if self.fault == "gradient":
            return _ScaleGradient.apply(out)
        raise RuntimeError("the faulty backend broke")


@pytest.mark.parametrize("fault, refused_modes, message", [
    ("output", {"fwd", "fwd+bwd"}, "MISMATCH out differs from eager"),
    ("gradient", {"fwd+bwd"}, "MISMATCH dx differs from eager"),
    ("raises", {"fwd", "fwd+bwd"}, "ERROR RuntimeError: the faulty backend broke"),
])
def test_bench_refuses_a_wrong_peer(tmp_path, capsys, monkeypatch, fault, refused_modes, message):
    """A peer whose output or gradients disagree with eager's, or that fails, is not timed,
    gets no speed-up, shows the error in its row, and makes the run fail; the honest
    peers of the same cases are timed as usual."""
    faulty = _FaultyBackend(fault)
    monkeypatch.setitem(dispatch._REGISTRY, faulty.name, faulty)
    out = tmp_path / "results"
    argv = ["bench", "--device", "cpu", "--suite", "mobilenetv3", "--quick", "--batch", "1",
            "--modes", "fwd,fwd+bwd", "--backends", f"{faulty.name},cpu", "--threads", "1",
            "--out", str(out)]
    assert main(argv) == 1
    captured = capsys.readouterr()
    rows = report.read_csv(next(out.glob("*.csv")))
    assert {r["peer"] for r in rows} == {"eager", faulty.name, "cpu"}
    for r in rows:
        refused = r["peer"] == faulty.name and r["mode"] in refused_modes
        if refused:
            assert r["check"].startswith(message), r["check"]
            for column in ("median_us", "p20_us", "p80_us", "gbps", "x_eager"):
                assert r[column] == "", (column, r[column])
        else:
            assert r["check"] == "ok", r
            _positive(r["median_us"])
            _positive(r["x_eager"])
    refused_rows = sum(r["check"] != "ok" for r in rows)
    assert refused_rows == 2 * len(refused_modes)
    assert f"error: {refused_rows} peer results were refused (not timed)" in captured.err
    assert message in captured.err
    markdown = next(out.glob("*.md")).read_text()
    assert message in markdown and "## Speed-up over eager" in markdown


def test_speedup_summary_gives_geomean_and_worst_case():
    def row(peer, batch, threads, x, check="ok", wall=math.nan):
        return {"network": "n", "channels": 8, "squeeze": 2, "height": 4, "width": 4,
                "batch": batch, "threads": threads, "dtype": "fp32", "layout": "nchw",
                "mode": "fwd", "peer": peer, "runs": "torch" if peer == "auto" else peer,
                "x_eager": x, "x_eager_wall": wall, "check": check}

    rows = [row("eager", 1, 1, 1.0), row("auto", 1, 1, 2.0), row("auto", 1, 2, 0.5),
            row("auto", 8, 1, math.nan, check="MISMATCH out differs"), row("auto", 8, 2, 4.0)]
    text = report.speedup_summary(rows, "x_eager", markdown=True)
    lines = text.splitlines()
    assert lines[0] == ("| peer | mode | threads | N | cases | geomean x eager | worst x eager "
                        "| worst case | refused |")
    assert "| auto | fwd | 1 | 1 | 1 | 2.00 | 2.00 | n C8 S2 4x4 N1 1T auto (torch) | 0 |" in lines
    assert "| auto | fwd | 1 | 8 | 1 | - | - | - | 1 |" in lines
    # Over everything: the geometric mean of 2, 0.5 and 4 is 4**(1/3); the refused row counts.
    assert f"| auto | fwd | all | all | 4 | {report.number(4 ** (1 / 3))} | 0.500 | n C8 S2 4x4 N1 2T auto (torch) | 1 |" in lines
    assert all("| eager |" not in line for line in lines)


def test_auto_is_labelled_with_the_backend_each_mode_runs(monkeypatch):
    """When auto picks a different backend per mode (here the cpu backend refuses calls
    that want no gradient), the auto row names what ran in its own mode."""
    from se_kernels.bench import peers

    shape = shapes.SEShape("efficientnet_b0", "features.1", 32, 8, 112, 112, "silu", "sigmoid")
    eager = peers.eager_module(shape, torch.device("cpu"), torch.float32)
    x = torch.randn(8, 32, 112, 112)
    monkeypatch.delenv(dispatch.BACKEND_ENV, raising=False)
    cpu = dispatch.get_backend("cpu")
    refusals = cpu.refusals
    monkeypatch.setattr(cpu, "refusals", lambda call: refusals(call) + (
        [] if call.wants_gradient() else ["pretend: inference only elsewhere"]))
    assert block.runs_backend(peers.AUTO, x, eager, "fwd") == "torch"
    assert block.runs_backend(peers.AUTO, x.requires_grad_(), eager, "fwd+bwd") == "cpu"


def test_the_busy_note_does_not_count_the_runs_own_threads(monkeypatch):
    """A 2-thread CPU run puts about 2 on a 2-core machine's load by itself: that alone is
    not a busy machine, while other work on top of it is."""
    from se_kernels.bench import runner

    cpu = torch.device("cpu")
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runner.os, "getloadavg", lambda: (2.0, 1.5, 1.0))
    assert runner._busy_note(cpu, own_threads=2) is None
    assert "load average 2.0 on 2 cores" in runner._busy_note(cpu)
    monkeypatch.setattr(runner.os, "getloadavg", lambda: (3.9, 3.0, 2.0))
    note = runner._busy_note(cpu, own_threads=2)
    assert note.startswith("the machine was busy (1-minute load average 3.9 on 2 cores, "
                           "2 of it this run's own threads)")


FAULTS_PER_ALLOCATION = """
import resource, sys, torch
from se_kernels.bench.host_memory import keep_freed_memory
if sys.argv[1] == "set":
    print(keep_freed_memory(), file=sys.stderr)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(16):  # the first ones grow the heap, and small blocks may split a freed one
    if i == 8:
        start = faults()
    torch.empty(48 << 20, dtype=torch.uint8).fill_(1)  # above glibc's largest dynamic threshold
print((faults() - start) / 8)
"""


def test_the_cpu_bench_reuses_freed_memory_instead_of_faulting_it_in():
    """With glibc's defaults a 48 MiB block is a fresh mapping on every allocation, each of
    its pages faulted in again; with the bench's thresholds, once the heap has grown, each
    allocation reuses the block freed before it. Run in child processes: the setting lasts
    for the process."""
    import subprocess
    import sys

    from se_kernels.bench import host_memory

    if host_memory._glibc() is None:
        pytest.skip("the bench changes malloc settings only under glibc")

    def faults_per_allocation(mode: str) -> tuple[float, str]:
        done = subprocess.run([sys.executable, "-c", FAULTS_PER_ALLOCATION, mode],
                              capture_output=True, text=True, check=True)
        return float(done.stdout), done.stderr

    default, _ = faults_per_allocation("default")
    tuned, note = faults_per_allocation("set")
    assert note.startswith("host malloc: glibc ") and "trim threshold 2 GiB" in note, note
    if "mmap threshold 1 GiB" not in note:
        pytest.skip(f"this glibc caps the mmap threshold below a 48 MiB block: {note}")
    assert default >= 10, f"{default} page faults per 48 MiB allocation with glibc's defaults"
    assert tuned < default / 4, (tuned, default)


def test_the_cpu_bench_notes_its_malloc_setting(monkeypatch):
    from se_kernels.bench import host_memory

    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    assert host_memory.keep_freed_memory() == "host malloc: not glibc, left as it is"
    calls = []

    def refusing(param, value):
        calls.append((param, value))
        return 0

    monkeypatch.setattr(host_memory, "_glibc", lambda: (refusing, "2.99"))
    assert "refused a fixed mmap threshold" in host_memory.keep_freed_memory()
    # Both mmap thresholds tried, and no trim threshold set without one.
    assert calls == [(host_memory.M_MMAP_THRESHOLD, t) for t in host_memory.MMAP_THRESHOLDS]


def test_bench_writes_each_case_as_it_finishes(tmp_path, monkeypatch):
    """The CSV gets each case's rows as soon as the case is done, and the markdown is
    rewritten with them, marked incomplete: a run stopped partway (here the third case
    raises) keeps every row it finished."""
    from se_kernels.bench import timing

    def fake_case(case, requested, device, *, quick, copy_gbps, refused):
        done = len(report.read_csv(next(out.glob("*.csv")))) if list(out.glob("*.csv")) else 0
        seen.append(done)
        if len(seen) == 3:
            raise RuntimeError("stopped")
        s = case.shape
        return [{"network": s.network, "layer": s.layer, "count": s.count, "batch": case.batch,
                 "channels": s.channels, "squeeze": s.squeeze, "height": s.height,
                 "width": s.width, "activation": s.activation, "gate": s.gate,
                 "dtype": case.dtype, "layout": case.layout, "mode": case.mode, "threads": 1,
                 "peer": peer, "runs": "", "median_us": 2.0, "p20_us": 1.0, "p80_us": 3.0,
                 "samples": 5, "floor_bytes": 100, "gbps": 1.0, "pct_copy_bw": 1.0,
                 "x_eager": 1.0, "x_compile": math.nan, "wall_us": math.nan,
                 "x_eager_wall": math.nan, "peak_mib": math.nan, "compile_s": math.nan,
                 "max_rel_err": 0.0, "check": "ok", "input_sets": 1} for peer in ("eager", "torch")]

    seen: list[int] = []
    out = tmp_path / "results"
    monkeypatch.setattr(block, "run_case", fake_case)
    monkeypatch.setattr(timing, "copy_bandwidth_gbps", lambda device, quick: 1.0)
    with pytest.raises(RuntimeError, match="stopped"):
        main(["bench", "--device", "cpu", "--suite", "mobilenetv3", "--quick", "--batch", "1",
              "--modes", "fwd,fwd+bwd", "--backends", "torch", "--threads", "1",
              "--out", str(out)])
    assert seen == [0, 2, 4]  # rows on disk when each case started
    rows = report.read_csv(next(out.glob("*.csv")))
    assert [(r["channels"], r["mode"], r["peer"]) for r in rows] == [
        ("72", "fwd", "eager"), ("72", "fwd", "torch"),
        ("72", "fwd+bwd", "eager"), ("72", "fwd+bwd", "torch")]
    markdown = next(out.glob("*.md")).read_text()
    assert "- incomplete: 2 of 4 block cases so far" in markdown
    assert markdown.count("| mobilenetv3 C72 S24 28x28 | 1 |") == 4
    assert not list(out.glob("*.png")) and not list(out.glob("*.partial"))
