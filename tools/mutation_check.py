#!/usr/bin/env python
"""Do the tests catch the bugs they claim to? Plants each bug of a catalogue, one at a time,
into a temporary copy of the repository, runs the tests meant to catch it there and prints
one line per bug, then `N caught, M survived`.

    python tools/mutation_check.py                # every bug (about 40 minutes on 2 cores)
    python tools/mutation_check.py --only triton  # one family: cpu, triton or cuda
    python tools/mutation_check.py -k ties        # bugs whose name contains "ties"
    python tools/mutation_check.py --list         # the catalogue

Families: "cpu" bugs go into the C++ CPU kernels (the copy's extension is built once, CPU
kernels only, then rebuilt incrementally per bug: about a minute each); "triton" bugs
into the Triton kernels (run by Triton's interpreter without a GPU); "cuda" bugs into the
CUDA kernels, run on the CPU emulator of tools/cuda_emulator (rebuilt per bug by its
tools/cuda_emulator/build.py, which the tests then load). Before
any bug is planted, each family's tests must pass on the unchanged copy. The exit status
is 0 when every bug was caught.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_KERNELS = "csrc/cpu/kernels_impl.h"
CPU_MLP = "csrc/cpu/mlp_impl.h"
TRITON_KERNELS = "se_kernels/backends/triton/kernels.py"
CUDA_TILES = "csrc/cuda/se_cuda_tiles.cuh"
CUDA_OPTIONS = "csrc/cuda/se_cuda_options.cuh"
CUDA_MLP = "csrc/cuda/se_cuda_mlp.cuh"
CUDA_SCHEDULES = "csrc/cuda/se_cuda_schedules.cuh"
CUDA_BACKWARD = "csrc/cuda/se_backward.cu"
CUDA_FORWARD = "csrc/cuda/se_forward.cu"
CUDA_STREAM = "csrc/cuda/se_stream.cu"
CPU_STREAM = "csrc/cpu/stream_impl.h"
CPU_TAIL = "csrc/cpu/tail_cpu.cpp"


@dataclass(frozen=True)
class Bug:
    name: str
    family: str                          # cpu | triton | cuda
    path: str                            # file the edits apply to
    edits: tuple[tuple[str, str], ...]   # (text, replacement): every occurrence is replaced
    note: str = ""


CATALOGUE = [
    # ---- CPU kernels ----------------------------------------------------------------
    Bug("cpu/ties-not-divided", "cpu", CPU_KERNELS, (
        ("dx_max[i] = dz[i] * max_share / count[i];", "dx_max[i] = dz[i] * max_share;"),)),
    Bug("cpu/split-reduce-writes-every-piece-to-the-first", "cpu", CPU_KERNELS, (
        ("const int64_t k = pieces == 1 ? 0 : item % pieces;", "const int64_t k = 0;"),)),
    Bug("cpu/split-combine-drops-first-piece", "cpu", CPU_KERNELS, (
        ("for (int64_t k = 0; k < pieces; ++k) v = Terms::combine(",
         "for (int64_t k = 1; k < pieces; ++k) v = Terms::combine("),)),
    # A span's last window overlaps the one before (for_windows, reduce_spatial): its lanes
    # already done must not be summed again.
    Bug("cpu/last-window-sums-its-overlap-twice", "cpu", CPU_KERNELS, (
        ("LanesFrom<acc_t>(p - (p1 - kWidth))", "LanesFrom<acc_t>(0)"),
        ("LanesFrom<at::opmath_type<scalar_t>>(i - (len - kWidth))",
         "LanesFrom<at::opmath_type<scalar_t>>(0)"))),
    Bug("cpu/bf16-dx-5-percent-off", "cpu", CPU_KERNELS, (
        ("L::store(dx + i, res[0], res[1], keep);",
         "if constexpr (std::is_same_v<scalar_t, at::BFloat16>) { res[0] = res[0] * Vec(1.05f);"
         " res[1] = res[1] * Vec(1.05f); }\n          L::store(dx + i, res[0], res[1], keep);"),
        ("dx[i] = static_cast<scalar_t>(v);",
         "if constexpr (std::is_same_v<scalar_t, at::BFloat16>) v *= acc_t(1.05);\n"
         "          dx[i] = static_cast<scalar_t>(v);"))),
    Bug("cpu/bias-dropped", "cpu", CPU_MLP, (
        ("y[n * ldy + r] = bias ? total[n * kRows + r] + bias[r] : total[n * kRows + r];",
         "y[n * ldy + r] = total[n * kRows + r];"),)),
    Bug("cpu/fc-tail-dropped", "cpu", CPU_MLP, (
        ("if (kv < K) step(kv,", "if (false) step(kv,"),)),
    # sum_rows' last strip of columns is masked where K is no multiple of the vector width.
    Bug("cpu/sum-rows-last-strip-stores-past-its-columns", "cpu", CPU_MLP, (
        ("acc[m][j].store(y + m * K + j * kLanes, last);",
         "acc[m][j].store(y + m * K + j * kLanes);"),)),
    Bug("cpu/sum-rows-strip-major-misses-tiles", "cpu", CPU_MLP, (
        ("const int64_t t = strip_major ? item / row_tiles : item % strip_tiles;",
         "const int64_t t = item % strip_tiles;"),)),
    Bug("cpu/silu-derivative", "cpu", CPU_MLP, (
        ("sig * (Vec(1) + av * (Vec(1) - sig))", "sig * (Vec(1) + av * sig)"),)),
    Bug("cpu/hardsigmoid-derivative-1/5", "cpu", CPU_MLP, (
        ("Vec(acc_t(1) / 6)", "Vec(acc_t(1) / 5)"),)),
    Bug("cpu/gelu-derivative-drops-density-term", "cpu", CPU_MLP, (
        ("dact = cdf + av * Vec(acc_t(kInvSqrt2Pi)) * (Vec(-0.5) * av * av).exp();",
         "dact = cdf;"),)),
    Bug("cpu/tanh-gate-derivative", "cpu", CPU_MLP, (
        ("dgate = Vec(1) - sv * sv;", "dgate = Vec(1) - sv;"),)),
    Bug("cpu/residual-grad-not-masked", "cpu", CPU_KERNELS, (
        ("if (dresidual) L::store(dresidual + i, dy[0], dy[1], keep);",
         "if (dresidual) { Vec raw[2]; L::load(grad_out + i, raw[0], raw[1]); "
         "L::store(dresidual + i, raw[0], raw[1], keep); }"),
        ("if (dresidual) dresidual[i] = static_cast<scalar_t>(dy);",
         "if (dresidual) dresidual[i] = grad_out[i];"))),
    Bug("cpu/relu-mask-ge", "cpu", CPU_KERNELS, (
        ("dy[h] = Vec::blendv(Vec(0), dy[h], o[h] > Vec(0));",
         "dy[h] = Vec::blendv(Vec(0), dy[h], o[h] >= Vec(0));"),
        ("> 0)) dy = 0;", ">= 0)) dy = 0;"))),
    # The stream ops' paths of the shared loops (stream_impl.h): terms the fused path never sets.
    Bug("cpu/stream-sumsq-sums-x", "cpu", CPU_KERNELS, (
        ("acc[kSquaresQ][h] = at::vec::fmadd(v[h], v[h], acc[kSquaresQ][h]);",
         "acc[kSquaresQ][h] = acc[kSquaresQ][h] + v[h];"),
        ("acc[kSquaresQ] += v * v;", "acc[kSquaresQ] += v;"))),
    # Channels-last only: in NCHW both halves of a vector hold one channel.
    Bug("cpu/stream-map-shift-high-half-takes-low", "cpu", CPU_KERNELS, (
        ("y[1] = y[1] + shift.hi(i);", "y[1] = y[1] + shift.lo(i);"),)),
    # The linear forms' inference kernel (stream_impl.h): the convolution across channels.
    Bug("cpu/linear-form-circular-clamps", "cpu", CPU_STREAM, (
        ("j = ((j % C) + C) % C;", "j = std::clamp<int64_t>(j, 0, C - 1);"),)),
    Bug("cpu/linear-form-conv-bias-dropped", "cpu", CPU_STREAM, (
        ("g[n * C + c] = b ? v + b[0] : v;", "g[n * C + c] = v;"),)),
    # Its backward: the convolution's transpose, and the weight gradient over sample groups.
    Bug("cpu/linear-form-conv-transpose-flipped", "cpu", CPU_STREAM, (
        ("dzn[j] += w[i] * d;", "dzn[j] += w[k - 1 - i] * d;"),)),
    Bug("cpu/linear-form-weight-grad-last-group-only", "cpu", CPU_STREAM, (
        ("if (!accumulate) {", "if (true) {"),)),
    # The block tail's algebra between its passes (tail_cpu.cpp): the variance's clamp at
    # zero, and the batch mean of du·x̂ in the input gradient's x coefficient.
    Bug("cpu/tail-variance-not-clamped", "cpu", CPU_TAIL, (
        ("std::max<scalar_t>(m[C + c] - mu * mu, 0)", "(m[C + c] - mu * mu)"),)),
    Bug("cpu/tail-x-scale-uncentred", "cpu", CPU_TAIL, (
        ("(mean_dux[c] - mean[c] * mean_du[c]) * r[c]", "mean_dux[c] * r[c]"),)),
    # The act tail's passes (kernels_impl.h): the derivative and its x-weighted sum.
    Bug("cpu/act-grad-map-drops-derivative", "cpu", CPU_KERNELS, (
        ("res[h] = d * at::vec::fmadd(dy[h], scale.lo(j), act_shift.lo(j));",
         "res[h] = at::vec::fmadd(dy[h], scale.lo(j), act_shift.lo(j));"),
        ("v = d * (static_cast<acc_t>(grad_out[i]) * scale.at(i) + act_shift.at(i));",
         "v = static_cast<acc_t>(grad_out[i]) * scale.at(i) + act_shift.at(i);"))),
    Bug("cpu/act-grad-reduce-sdx-sums-x", "cpu", CPU_KERNELS, (
        ("acc[kDX][h] = at::vec::fmadd(d, xv[h], acc[kDX][h]);",
         "acc[kDX][h] = acc[kDX][h] + xv[h];"),
        ("acc[kDX] += d * xv;", "acc[kDX] += xv;"))),
    # ---- Triton kernels ----------------------------------------------------------------
    Bug("triton/ties-not-divided", "triton", TRITON_KERNELS, (
        ("tl.store(dx_max_ptr + idx, dz / count, mask=mask)", "tl.store(dx_max_ptr + idx, dz, mask=mask)"),
        ("tl.store(dx_max_ptr + idx, dz * 0.5 / count, mask=mask)",
         "tl.store(dx_max_ptr + idx, dz * 0.5, mask=mask)"))),
    Bug("triton/split-combine-keeps-last-piece", "triton", TRITON_KERNELS, (
        ("total += tl.load(sum_ptr + k * nc + idx, mask=mask, other=0.0)",
         "total = tl.load(sum_ptr + k * nc + idx, mask=mask, other=0.0)"),)),
    Bug("triton/split-combine-ds-keeps-last-piece", "triton", TRITON_KERNELS, (
        ("ds += tl.load(ds_ptr + k * nc + idx, mask=mask, other=0.0)",
         "ds = tl.load(ds_ptr + k * nc + idx, mask=mask, other=0.0)"),)),
    Bug("triton/silu-derivative", "triton", TRITON_KERNELS, (
        ("da = dh * sig * (1.0 + a * (1.0 - sig))", "da = dh * sig * (1.0 + a * sig)"),)),
    Bug("triton/sigmoid-derivative", "triton", TRITON_KERNELS, (
        ("d = s * (1.0 - s)", "d = 1.0 - s"),)),
    Bug("triton/tanh-gate-derivative", "triton", TRITON_KERNELS, (
        ("d = 1.0 - t * t", "d = 1.0 - t"),)),
    Bug("triton/hardswish-derivative-slope", "triton", TRITON_KERNELS, (
        ("a / 3.0 + 0.5", "a / 6.0 + 0.5"),)),
    Bug("triton/hardsigmoid-derivative-float32-sixth", "triton", TRITON_KERNELS, (
        ("d = tl.where((g > -3.0) & (g < 3.0), 1.0, 0.0).to(g.dtype) / 6.0",
         "d = tl.where((g > -3.0) & (g < 3.0), 1.0 / 6.0, 0.0)"),),
        note="3e-8 off, in fp64 only"),
    Bug("triton/bf16-dx-5-percent-off", "triton", TRITON_KERNELS, (
        ("    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask,",
         "    if dx_ptr.dtype.element_ty == tl.bfloat16:\n        dx = dx * 1.05\n"
         "    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask,"),)),
    Bug("triton/bias-dropped", "triton", TRITON_KERNELS, (
        ("y += tl.load(bias_ptr + m, mask=m_mask, other=0.0).to(out_ptr.dtype.element_ty)[None, :]",
         "y += 0.0"),)),
    Bug("triton/relu-mask-ge", "triton", TRITON_KERNELS, (
        ("dy = tl.where(o > 0, dy, 0.0)", "dy = tl.where(o >= 0, dy, 0.0)"),)),
    Bug("triton/residual-grad-not-masked", "triton", TRITON_KERNELS, (
        ("tl.store(dres_ptr + offs, dy.to(dres_ptr.dtype.element_ty), mask=mask,",
         "tl.store(dres_ptr + offs, tl.load(dout_ptr + offs, mask=mask, other=0.0), mask=mask,"),)),
    # The stream ops' flags (SUM_DY, X_SCALE), which the fused SE path leaves off.
    Bug("triton/stream-sum-dy-accumulates-dy-x", "triton", TRITON_KERNELS, (
        ("dy_total += dy", "dy_total += dy * v"),)),
    Bug("triton/stream-grad-map-x-scale-times-dy", "triton", TRITON_KERNELS, (
        ("dx += tl.load(x_scale_ptr + chan, mask=c_mask, other=0.0) * v",
         "dx += tl.load(x_scale_ptr + chan, mask=c_mask, other=0.0) * dy"),)),
    # The act tail's prologue (PRE_ACT), which the SE path and the other stream ops leave off.
    Bug("triton/act-grad-reduce-sdx-drops-x", "triton", TRITON_KERNELS, (
        ("dx_total += d * v", "dx_total += d"),)),
    # ---- CUDA kernels, on the emulator ----------------------------------------------------
    Bug("cuda/ties-not-divided", "cuda", CUDA_BACKWARD, (
        ("dx_max[nc] = dz / ld_fresh(count + nc);", "dx_max[nc] = dz;"),
        ("dx_max[nc] = dz * A(0.5) / ld_fresh(count + nc);", "dx_max[nc] = dz * A(0.5);"))),
    Bug("cuda/split-combine-drops-second-piece", "cuda", CUDA_TILES, (
        ("for (int k0 = 1; k0 < pieces; k0 += kBatch) {",
         "for (int k0 = 2; k0 < pieces; k0 += kBatch) {"),)),
    Bug("cuda/bf16-dx-5-percent-off", "cuda", CUDA_BACKWARD, (
        ("d.v[i] = from_acc<T>(v);",
         "d.v[i] = from_acc<T>(std::is_same<T, __nv_bfloat16>::value ? v * A(1.05) : v);"),)),
    Bug("cuda/bias-dropped", "cuda", CUDA_FORWARD, (
        ("const A v = b1 != nullptr ? sum + to_acc(b1[j]) : sum;", "const A v = sum;"),)),
    Bug("cuda/hardswish-derivative-slope", "cuda", CUDA_OPTIONS, (
        ("a / A(3) + A(0.5)", "a / A(6) + A(0.5)"),)),
    Bug("cuda/relu-gate-passes-negative-logits", "cuda", CUDA_OPTIONS, (
        ("case Gate::ReLU: return g > A(0) ? ds : A(0);", "case Gate::ReLU: return ds;"),)),
    Bug("cuda/hardsigmoid-derivative-float32-sixth", "cuda", CUDA_OPTIONS, (
        ("? ds / A(6) : A(0);", "? ds * A(1.0f / 6.0f) : A(0);"),), note="3e-8 off, in fp64 only"),
    Bug("cuda/residual-grad-not-masked", "cuda", CUDA_BACKWARD, (
        ("r.v[i] = from_acc<T>(dy);", "r.v[i] = e.dy.v[i];"),
        ("masked.v[i] = from_acc<T>(dy);", "masked.v[i] = e.dy.v[i];"))),
    Bug("cuda/relu-mask-ge", "cuda", CUDA_BACKWARD, (
        ("!(to_acc(e.out.v[i]) > A(0))", "!(to_acc(e.out.v[i]) >= A(0))"),)),
    # The stream ops' Terms (se_stream.cu).
    Bug("cuda/stream-min-drops-nan", "cuda", CUDA_STREAM, (
        ("acc[3][j] = nan_min(acc[3][j], v);", "acc[3][j] = v < acc[3][j] ? v : acc[3][j];"),)),
    Bug("cuda/stream-dresidual-not-masked", "cuda", CUDA_STREAM, (
        ("masked.v[i] = from_acc<T>(dy);", "masked.v[i] = e.dy.v[i];"),)),
    Bug("cuda/act-grad-map-drops-act-shift", "cuda", CUDA_STREAM, (
        ("cv[2][j] * to_acc(e.dy.v[i]) + cv[3][j], act);", "cv[2][j] * to_acc(e.dy.v[i]), act);"),)),
    # Races and divergent shuffles: results on the emulator depend on its thread schedule.
    Bug("cuda/reduce-nchw-early-return-before-shuffles", "cuda", CUDA_TILES, (
        ("  const RowSpan span = row_span(plan, P, block);\n\n  A acc[kQ][1];",
         "  const RowSpan span = row_span(plan, P, block);\n  if (span.row >= rows) return;\n\n"
         "  A acc[kQ][1];"),),
        note="schedule-dependent"),
    Bug("cuda/cols-dot-last-warp-without-barrier", "cuda", CUDA_MLP, (
        ("  __syncthreads();\n  if (warp == 0 && col < cols) {",
         "  if (warp == kWarps - 1 && col < cols) {"),), note="schedule-dependent"),
    Bug("cuda/reduce-cl-barrier-dropped", "cuda", CUDA_TILES, (
        ("    for (int i = 0; i < W; ++i) red[(q * W + i) * kThreads + threadIdx.x] = acc[q][i];\n"
         "  __syncthreads();\n",
         "    for (int i = 0; i < W; ++i) red[(q * W + i) * kThreads + threadIdx.x] = acc[q][i];\n"),),
        note="schedule-dependent"),
    # The pipelined schedule's synchronization.
    Bug("cuda/pipeline-map-waits-for-mlp1-only", "cuda", CUDA_SCHEDULES, (
        ("wait_until(sync.mlp2(g), static_cast<unsigned>(p.mlp2.items));",
         "wait_until(sync.mlp1(g), static_cast<unsigned>(p.mlp1.items));"),),
        note="schedule-dependent"),
    Bug("cuda/pipeline-first-tile-combines", "cuda", CUDA_SCHEDULES, (
        ("if (publish(sync.reduced(g)) == p.pass.ctas - 1) {",
         "if (publish(sync.reduced(g)) == 0) {"),)),
    Bug("cuda/pipeline-dresidual-read-through-ldg", "cuda", CUDA_BACKWARD, (
        ("e.dy = fresh_dy ? load_pack<W, true>(grad_out + off) : load_pack<W>(grad_out + off);",
         "e.dy = load_pack<W>(grad_out + off);"),)),
    # 16-byte accesses: a sample group starting n0·C·H·W elements in, not a multiple of the
    # vector width, still places the NCHW walk's vectors on 16-byte boundaries.
    Bug("cuda/nchw-vectors-ignore-group-phase", "cuda", CUDA_TILES, (
        ("return static_cast<int>(n0 * C * P % W);", "return 0;"),)),
]

# The tests each family's bugs must fail, cheapest first (pytest stops at the first failure).
FAMILY_TESTS = {
    "cpu": (["tests/test_ties.py", "tests/test_backends.py", "tests/test_low_precision.py",
             "tests/test_stream_cpu.py", "tests/test_form_ops_cpu.py", "tests/test_act_tail.py",
             "tests/test_tail_ops.py", "tests/test_fc_ops.py"],
            "cpu or low_precision"),
    "triton": (["tests/test_ties.py", "tests/test_backends.py", "tests/test_triton_kernels.py",
                "tests/test_triton_stream.py"],
               "triton and (tied or split or every_option or dtypes or odd_shapes or small_tiles"
               " or stream)"),
    "cuda": (["tests/test_ties.py", "tests/test_cuda_emulation.py",
              "tests/test_cuda_stream_emulation.py"],
             "emulated or test_cuda_emulation or test_cuda_stream_emulation"),
}


def copy_repository(dest: Path) -> None:
    """The working tree as it is (tracked and untracked, not ignored), plus the built
    extension if there is one."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for built in (*ROOT.glob("se_kernels/_C*.so"), ROOT / "se_kernels/_build_info.py"):
        if built.exists():
            shutil.copy2(built, dest / "se_kernels" / built.name)


def run(command: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def build_cpu_extension(work: Path, env: dict) -> None:
    """The copy's extension with the CPU kernels only; incremental after the first call."""
    result = run([sys.executable, "setup.py", "build_ext", "--inplace"], work,
                 dict(env, SE_KERNELS_NO_CUDA="1", FORCE_CUDA="0"), timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"building the extension failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")


def build_emulator(work: Path, env: dict) -> None:
    """The copy's CUDA emulator, built by its own loader into the copy's extension directory,
    where the tests find it current."""
    result = run([sys.executable, "tools/cuda_emulator/build.py", "se_kernels"], work, env,
                 timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"the emulator does not compile:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")


def run_tests(family: str, work: Path, env: dict) -> tuple[bool, str]:
    """(passed, the first failure's name) for the family's tests in the copy."""
    files, selection = FAMILY_TESTS[family]
    if family == "cuda":
        build_emulator(work, env)
    result = run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                  "-k", selection, *files], work, env, timeout=3600)
    output = result.stdout + result.stderr
    if "Error building extension" in output:
        raise RuntimeError(f"the emulator does not compile:\n{output[-3000:]}")
    if result.returncode == 5:
        raise RuntimeError(f"no tests selected for {family}")
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return result.returncode == 0, failed[0] if failed else output.strip().splitlines()[-1:]


def planted_text(bug: Bug, text: str) -> str:
    """`text` (the contents of bug.path) with the bug's edits applied. RuntimeError when an
    edit's text is missing, when the edits change nothing, or when a planted Python file
    does not compile: the catalogue no longer matches the code."""
    planted = text
    for old, new in bug.edits:
        if old not in planted:
            raise RuntimeError(f"{bug.name}: {bug.path} no longer contains {old!r}: update the catalogue")
        planted = planted.replace(old, new)
    if planted == text:
        raise RuntimeError(f"{bug.name}: the edits leave {bug.path} unchanged")
    if bug.path.endswith(".py"):
        try:
            compile(planted, bug.path, "exec", dont_inherit=True)
        except SyntaxError as error:
            raise RuntimeError(f"{bug.name}: the planted bug does not compile: {error}") from None
    return planted


def plant(bug: Bug, work: Path) -> str:
    """Applies the bug's edits to the copy in `work`; returns the original text of the file."""
    path = work / bug.path
    original = path.read_text()
    path.write_text(planted_text(bug, original))
    return original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(FAMILY_TESTS), action="append",
                        help="run one family's bugs (repeatable)")
    parser.add_argument("-k", dest="name", help="only bugs whose name contains this")
    parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    args = parser.parse_args(argv)

    bugs = [b for b in CATALOGUE if (not args.only or b.family in args.only)
            and (not args.name or args.name in b.name)]
    if args.list:
        for bug in bugs:
            print(f"{bug.name:50s} {bug.path}" + (f"  ({bug.note})" if bug.note else ""))
        return 0
    if not bugs:
        print("no bug matches", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="se_kernels_mutation_"))
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"),
               TORCH_EXTENSIONS_DIR=str(work / ".torch_extensions"))
    env.pop("PYTHONPATH", None)  # the copy's se_kernels, from its root
    families = sorted({b.family for b in bugs}, key=list(FAMILY_TESTS).index)
    caught = survived = 0
    try:
        copy_repository(work)
        print(f"copy of {ROOT} in {work}", flush=True)
        if "cpu" in families:
            t0 = time.time()
            build_cpu_extension(work, env)
            print(f"built the copy's CPU extension ({time.time() - t0:.0f} s)", flush=True)
        for family in families:
            t0 = time.time()
            passed, failure = run_tests(family, work, env)
            if not passed:
                print(f"{family} tests fail without any planted bug ({failure}): nothing to measure",
                      file=sys.stderr)
                return 2
            print(f"{family} tests pass on the unchanged copy ({time.time() - t0:.0f} s)", flush=True)
        for bug in bugs:
            t0 = time.time()
            original = plant(bug, work)
            try:
                if bug.family == "cpu":
                    build_cpu_extension(work, env)
                passed, failure = run_tests(bug.family, work, env)
            finally:
                (work / bug.path).write_text(original)
            note = f" [{bug.note}]" if bug.note else ""
            if passed:
                survived += 1
                print(f"SURVIVED  {bug.name}{note}  ({time.time() - t0:.0f} s)", flush=True)
            else:
                caught += 1
                print(f"caught    {bug.name}{note}  by {failure}  ({time.time() - t0:.0f} s)", flush=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{caught} caught, {survived} survived")
    return 0 if survived == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
