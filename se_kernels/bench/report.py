"""Results out: the terminal table, CSV, markdown, PNG plot, and the comparison with an
earlier CSV. Rows are plain dicts (one per case and peer); NaN means "not measured"."""

from __future__ import annotations

import csv
import importlib.metadata
import datetime as _dt
import math
import platform
import re
import shlex
import sys
from pathlib import Path

import torch

BLOCK_COLUMNS = [
    "network", "layer", "count", "batch", "channels", "squeeze", "height", "width",
    "activation", "gate", "dtype", "layout", "mode", "threads", "peer", "runs", "median_us",
    "p20_us", "p80_us", "samples", "floor_bytes", "gbps", "pct_copy_bw", "x_eager", "x_compile",
    "wall_us", "x_eager_wall", "peak_mib", "compile_s", "max_rel_err", "check", "input_sets",
]
CASE_KEY = ("network", "channels", "squeeze", "height", "width", "batch", "dtype", "layout",
            "mode", "threads", "peer")


# -- formatting -----------------------------------------------------------------------------

def number(value, digits: int = 3) -> str:
    """A number with `digits` significant figures, '-' when it was not measured."""
    if value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    magnitude = abs(value)
    if magnitude >= 10 ** digits:
        return f"{value:.0f}"
    if magnitude == 0:
        return "0"
    decimals = max(0, digits - 1 - math.floor(math.log10(magnitude)))
    return f"{value:.{decimals}f}"


def table(headers: list[str], rows: list[list[str]], *, markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    def line(cells):
        return "  ".join(c.rjust(w) if i >= 1 else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def shape_label(row: dict) -> str:
    return (f"{row['network']} C{row['channels']} S{row['squeeze']} "
            f"{row['height']}x{row['width']}")


def peer_label(row: dict) -> str:
    """The peer, with the backend auto picked: 'auto (cpu)'."""
    runs = row.get("runs")
    return f"{row['peer']} ({runs})" if runs and runs != row["peer"] else row["peer"]


def _measured(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def block_table(rows: list[dict], *, markdown: bool, extra: list[tuple[str, str]] = ()) -> str:
    """One line per case and peer; the wall-clock columns only where they were measured
    (GPU), the check column holds the error of a peer that was refused. extra: (header,
    row key) of further ratios, after x compile."""
    walls = any(_measured(r.get("wall_us")) for r in rows)
    headers = ["shape", "N", "threads", "dtype", "layout", "mode", "peer", "median us",
               "p20-p80 us", "GB/s", "% copy", "x eager", "x compile", *(h for h, _ in extra),
               *(["wall us", "x eager wall"] if walls else []), "peak MiB", "compile s", "check"]
    body = []
    for r in rows:
        body.append([shape_label(r), str(r["batch"]), str(r.get("threads", "")), r["dtype"],
                     r["layout"], r["mode"], peer_label(r), number(r["median_us"]),
                     f"{number(r['p20_us'])}-{number(r['p80_us'])}", number(r["gbps"]),
                     number(r["pct_copy_bw"], 2), number(r["x_eager"]), number(r["x_compile"]),
                     *(number(r.get(key)) for _, key in extra),
                     *([number(r.get("wall_us")), number(r.get("x_eager_wall"))] if walls else []),
                     number(r["peak_mib"]), number(r["compile_s"], 2), r["check"]])
    return table(headers, body, markdown=markdown)


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values)) if values else math.nan


def speedup_summary(rows: list[dict], column: str, *, markdown: bool,
                    baseline: str = "eager") -> str:
    """Per peer (the baseline `column` is over excluded), mode, thread count and batch, then
    per peer and mode over all of them: the geometric mean and the worst of `column`
    (x_eager, x_eager_wall, x_se_only) with the case it happened on, and how many of the
    peer's rows were refused (a wrong answer or an error: not timed)."""
    def ordered(key) -> list:
        return list(dict.fromkeys(key(r) for r in rows if r["peer"] != baseline))

    body = []
    for peer in ordered(lambda r: r["peer"]):
        for mode in ordered(lambda r: r["mode"]):
            mine = [r for r in rows if r["peer"] == peer and r["mode"] == mode]
            groups = [((str(t), str(n)), [r for r in mine if (r.get("threads"), r["batch"]) == (t, n)])
                      for t, n in ordered(lambda r: (r.get("threads"), r["batch"]))]
            overall = [(("all", "all"), mine)] if len(groups) > 1 else []
            for (threads, batch), members in [*groups, *overall]:
                if not members:
                    continue
                timed = [r for r in members if _measured(r.get(column))]
                worst = min(timed, key=lambda r: r[column]) if timed else None
                refused = sum(r.get("check") != "ok" for r in members)
                body.append([peer, mode, threads, batch, str(len(members)),
                             number(geomean([r[column] for r in timed])),
                             number(worst[column]) if worst else "-",
                             f"{shape_label(worst)} N{worst['batch']} {worst.get('threads', '')}T "
                             f"{peer_label(worst)}" if worst else "-", str(refused)])
    name = column.replace("_", " ")
    headers = ["peer", "mode", "threads", "N", "cases", f"geomean {name}", f"worst {name}",
               "worst case", "refused"]
    return table(headers, body, markdown=markdown)


# -- files ----------------------------------------------------------------------------------

def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"CPU {model} ({threads} thread{'s' if threads != 1 else ''})"


def output_stem(out_dir: Path, device: torch.device, today: _dt.date | None = None) -> Path:
    """<out>/<device-slug>-<date>; a second run on the same day gets the time appended."""
    name = device_name(device).split(" (")[0]
    stem = out_dir / f"{slug(name)}-{(today or _dt.date.today()).isoformat()}"
    if any(stem.with_name(stem.name + ext).exists()
           for ext in (".csv", ".md", "-model.csv", "-tail.csv")):
        stem = stem.with_name(stem.name + _dt.datetime.now().strftime("-%H%M%S"))
    return stem


def versions() -> dict[str, str]:
    import se_kernels

    found = {"se_kernels": se_kernels.__version__, "torch": torch.__version__,
             "CUDA": torch.version.cuda or "none", "python": platform.python_version()}
    for distribution in ("triton", "torchvision", "timm"):
        try:
            found[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            found[distribution] = "not installed"
    return found


def header(title: str, device: torch.device, argv: list[str], extra: list[str]) -> str:
    command = "se-kernels " + " ".join(shlex.quote(a) for a in argv)
    lines = [f"# {title}: {device_name(device)}", "",
             f"- date: {_dt.datetime.now().isoformat(timespec='seconds')}",
             f"- command: `{command}`",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
             f"- device: {device_name(device)}"]
    return "\n".join(lines + [f"- {line}" for line in extra])


def _csv_values(row: dict) -> dict:
    return {k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


class CsvRows:
    """A CSV written as rows arrive: the header at once, then each batch of rows appended
    and flushed, so that a run stopped partway (a time limit, a crash, a kill) leaves every
    row it finished on disk."""

    def __init__(self, path: Path, columns: list[str]):
        self.path = path
        self._handle = path.open("w", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=columns, extrasaction="ignore")
        self._writer.writeheader()
        self._handle.flush()

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            self._writer.writerow(_csv_values(row))
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


def write_csv(rows: list[dict], path: Path, columns: list[str]) -> None:
    out = CsvRows(path, columns)
    out.add(rows)
    out.close()


def write_text_atomically(path: Path, text: str) -> None:
    """Replaces path's contents in one step: a reader, or a run killed mid-write, sees the
    old file or the new one, never half of one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def read_csv(path: Path) -> list[dict]:
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


def plot_blocks(rows: list[dict], path: Path, title: str) -> None:
    """Speed-up over eager of every peer, one panel per mode, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    peers = [p for p in dict.fromkeys(r["peer"] for r in rows) if p != "eager"]
    from matplotlib.ticker import FormatStrFormatter

    per_panel = len(rows) / max(len(modes), 1) / max(len(peers) + 1, 1)  # cases per panel
    fig, axes = plt.subplots(len(modes), 1, squeeze=False,
                             figsize=(max(8, 0.45 * per_panel * max(len(peers), 1)), 5 * len(modes)))
    for ax, mode in zip(axes[:, 0], modes):
        mode_rows = [r for r in rows if r["mode"] == mode]
        def case_of(r):
            return shape_label(r), r["batch"], r.get("threads", ""), r["dtype"], r["layout"]

        cases = list(dict.fromkeys(case_of(r) for r in mode_rows))
        width = 0.8 / max(len(peers), 1)
        for i, peer in enumerate(peers):
            by_case = {case_of(r): r["x_eager"] for r in mode_rows if r["peer"] == peer}
            values = [by_case.get(c, math.nan) for c in cases]
            ax.bar([j + (i - (len(peers) - 1) / 2) * width for j in range(len(cases))], values,
                   width, label=peer)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
        ax.set_ylabel("speed-up over eager")
        ax.set_title(f"{title}: {mode}")
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([f"{c[0]}\nN{c[1]} {c[2]}T {c[3]} {c[4]}" for c in cases], rotation=60,
                           ha="right", fontsize=7)
        ax.legend(fontsize=8, ncol=len(peers))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- comparison -----------------------------------------------------------------------------

MODEL_KEY = ("family", "model", "backend", "compiled", "task", "batch", "image", "precision")


def compare(old_rows: list[dict], new_rows: list[dict], *, markdown: bool) -> str:
    """Old and new median time of every row present in both runs, matched on what was run
    (CASE_KEY for block rows, MODEL_KEY for model rows); 'x faster' is old/new (above 1:
    the new run is faster). Ends with the geometric mean per peer."""
    is_model = bool(new_rows) and "task" in new_rows[0]
    key_columns, value = (MODEL_KEY, "median_ms") if is_model else (CASE_KEY, "median_us")
    unit = "ms" if is_model else "us"

    if old_rows and not is_model and not any(r.get("threads") for r in old_rows):
        key_columns = tuple(k for k in key_columns if k != "threads")  # a file without threads

    def key(row: dict) -> tuple[str, ...]:
        return tuple(str(row.get(k, "")) for k in key_columns)

    old = {key(r): float(r[value]) for r in old_rows if r.get(value) not in ("", None)}
    new_rows = [r for r in new_rows if _measured(r.get(value))]
    headers = [*key_columns, f"old {unit}", f"new {unit}", "x faster"]
    body, per_peer = [], {}
    for r in new_rows:
        if key(r) not in old:
            continue
        ratio = old[key(r)] / r[value]
        peer = f"{r['model']} {r['backend']}".strip() if is_model else r["peer"]
        per_peer.setdefault(peer, []).append(ratio)
        body.append([*key(r), number(old[key(r)]), number(r[value]), number(ratio)])
    matched = len(body)
    lines = [table(headers, body, markdown=markdown), ""]
    for peer, ratios in per_peer.items():
        lines.append(f"{peer}: geometric mean x faster {number(geomean(ratios))} over {len(ratios)} rows")
    lines.append(f"matched {matched} of {len(new_rows)} new rows; "
                 f"{len(old) - matched} rows of the old file are not in this run")
    return "\n".join(lines)


def model_table(rows: list[dict], *, markdown: bool) -> str:
    headers = ["task", "family", "model", "backend", "compiled", "batch", "image", "precision",
               "median ms", "p20-p80 ms", "images/s", "SE/plain", "reference", "peak MiB",
               "compile s"]
    body = []
    for r in rows:
        ratio = r["time_vs_plain"] if r["task"] == "train" else r["throughput_vs_plain"]
        body.append([r["task"], r["family"], r["model"], r["backend"] or "-",
                     "yes" if r["compiled"] else "no", str(r["batch"]), str(r["image"]),
                     r["precision"], number(r["median_ms"]),
                     f"{number(r['p20_ms'])}-{number(r['p80_ms'])}", number(r["images_per_s"]),
                     number(ratio), number(r["reference_ratio"]), number(r["peak_mib"]),
                     number(r["compile_s"], 2)])
    return table(headers, body, markdown=markdown)


def print_err(*parts) -> None:
    print(*parts, file=sys.stderr)


def plot_models(rows: list[dict], path: Path, title: str) -> None:
    """SE/plain per SE model and task (train: time ratio; infer: throughput ratio), with the
    published ratio as a black tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    se_rows = [r for r in rows if r["se"]]
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(se_rows)), 4.5))
    labels, values, refs = [], [], []
    for r in se_rows:
        labels.append(f"{r['task']}{' compiled' if r['compiled'] else ''}\n{r['family']} "
                      f"{r['model']}\n{r['backend'] or 'eager'}")
        values.append(r["time_vs_plain"] if r["task"] == "train" else r["throughput_vs_plain"])
        refs.append(r["reference_ratio"])
    ax.bar(range(len(values)), values, color=["tab:orange" if "train" in l else "tab:blue"
                                              for l in labels])
    ax.scatter(range(len(refs)), refs, marker="_", s=400, color="black", label="published")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("SE / plain (train: time, infer: throughput)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
