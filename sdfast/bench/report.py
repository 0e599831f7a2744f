"""The bench schema (one row per backend and metric) and its renderings: table, Markdown, JSON, CSV, bar plot.

Every run carries its machine, versions and workload, so runs from two machines merge by concatenation.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdfast.errors import ConfigError

SCHEMA = "sdfast.bench/1"

# metric -> (unit, label); the order is the report's order
METRICS: dict[str, tuple[str, str]] = {
    "load": ("s", "engine load (cold start)"),
    "text_encoder": ("ms", "text encoder"),
    "unet_step_cfg": ("ms", "denoiser step (U-Net; SD3: transformer), with guidance"),
    "unet_step": ("ms", "denoiser step (U-Net; SD3: transformer), no guidance"),
    "vae_decode": ("ms", "VAE decode"),
    "vae_encode": ("ms", "VAE encode"),
    "end_to_end": ("ms", "end to end, N steps"),
    "host_overhead_per_step": ("ms", "host overhead per step"),
    "unet_step_in_loop": ("ms", "denoiser step in the device loop"),
    "host_queue_per_step": ("ms", "host time queuing a device step"),
    "unet_gflops": ("GFLOP/s", "denoiser effective"),
    "unet_peak_fraction": ("%", "denoiser share of peak (CPU fp32, GPU dense fp16)"),
    "unet_ceiling_fraction": ("%", "denoiser share of the measured FMA ceiling (CPU)"),
    "unet_step_int8": ("ms", "int8 U-Net step (sdfast quantize), same call"),
    "unet_int8_gops": ("GOP/s", "int8 U-Net effective"),
    "unet_int8_ceiling_fraction": ("%", "int8 U-Net share of the measured int8 ceiling (CPU)"),
    "peak_rss_load": ("MiB", "peak RSS: loading"),
    "peak_rss_text_encoder": ("MiB", "peak RSS: text encoder"),
    "peak_rss_unet": ("MiB", "peak RSS: denoiser steps"),
    "peak_rss_vae_decode": ("MiB", "peak RSS: VAE decode"),
    "peak_rss_vae_encode": ("MiB", "peak RSS: VAE encode"),
    "peak_rss_end_to_end": ("MiB", "peak RSS: end to end"),
    "peak_rss": ("MiB", "peak RSS"),
    "peak_device_memory": ("MiB", "peak device memory"),
}
GPU_ONLY_METRICS = ("peak_device_memory", "unet_step_in_loop", "host_queue_per_step")  # rows a CPU backend does not have
INT8_METRICS = ("unet_step_int8", "unet_int8_gops", "unet_int8_ceiling_fraction")  # only with sdfast quantize's U-Net
STAGES = ("text_encoder", "unet_step_cfg", "unet_step", "vae_decode", "vae_encode")  # the plot's bars
CSV_COLUMNS = ("date", "cpu", "cores", "model", "height", "width", "batch", "steps", "precision",
               "backend", "metric", "unit", "median", "p90", "min", "max", "n", "note")


@dataclass
class Row:
    backend: str
    metric: str
    median: float
    p90: float | None = None
    min: float | None = None
    max: float | None = None
    n: int = 1
    note: str = ""

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"unknown bench metric '{self.metric}'")

    @property
    def unit(self) -> str:
        return METRICS[self.metric][0]

    def to_json(self) -> dict:
        return {**asdict(self), "unit": self.unit}


@dataclass
class BenchRun:
    date: str
    command: str
    machine: dict
    versions: dict
    workload: dict  # model, height, width, batch, steps, repeat, precision
    rows: list[Row] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"backend", "reason"}

    def to_json(self) -> dict:
        return {"schema": SCHEMA, "date": self.date, "command": self.command, "machine": self.machine, "versions": self.versions,
                "workload": self.workload, "rows": [r.to_json() for r in self.rows], "skipped": self.skipped}

    @classmethod
    def from_json(cls, data: dict, source: str = "bench results") -> "BenchRun":
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ConfigError(f"{source} is not an sdfast bench result (schema {SCHEMA})")
        missing = [k for k in ("model", "height", "width", "batch", "steps", "repeat", "precision") if k not in data.get("workload", {})]
        if missing:
            raise ConfigError(f"{source} does not follow the bench schema: its workload lacks {', '.join(missing)}")
        try:
            rows = [Row(**{k: v for k, v in r.items() if k != "unit"}) for r in data["rows"]]
            return cls(data["date"], data["command"], data["machine"], data["versions"], data["workload"], rows, data.get("skipped", []))
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(f"{source} does not follow the bench schema: {error}") from None

    @classmethod
    def load(cls, path: Path) -> list["BenchRun"]:
        """The runs in a results file: one run, or the list that --out writes after a --merge."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"cannot read bench results '{path}': {error}") from None
        return [cls.from_json(item, f"'{path}'") for item in (data if isinstance(data, list) else [data])]

    def value(self, backend: str, metric: str) -> Row | None:
        return next((r for r in self.rows if r.backend == backend and r.metric == metric), None)

    @property
    def backends(self) -> list[str]:
        return list(dict.fromkeys(r.backend for r in self.rows))


def _cell(row: Row | None) -> str:
    if row is None:
        return "-"
    digits = 0 if abs(row.median) >= 100 else 1 if abs(row.median) >= 10 else 2
    text = f"{row.median:.{digits}f}"
    if row.n > 1 and row.min is not None:
        text += f" ({row.min:.{digits}f}-{row.max:.{digits}f})"
    return text


def _columns(runs: list[BenchRun]) -> list[tuple[BenchRun, str, str]]:
    """(run, backend, heading) per column; the machine joins the heading once runs from several machines are merged."""
    several = len({r.machine.get("cpu") for r in runs}) > 1 or len(runs) > 1
    return [(run, b, f"{b} @ {run.machine.get('cpu', '?')}" if several else b) for run in runs for b in run.backends]


def _grid(runs: list[BenchRun]) -> tuple[list[str], list[list[str]]]:
    columns = _columns(runs)
    header = ["metric", "unit", *[heading for _, _, heading in columns]]
    lines = []
    for metric, (unit, label) in METRICS.items():
        cells = [_cell(run.value(backend, metric)) for run, backend, _ in columns]
        if any(c != "-" for c in cells):
            steps = runs[0].workload.get("steps")
            lines.append([label.replace("N steps", f"{steps} steps"), unit, *cells])
    return header, lines


def _footer(runs: list[BenchRun]) -> list[str]:
    notes = []
    for run in runs:
        w, m = run.workload, run.machine
        notes.append(f"{w['model']} {w['width']}x{w['height']}, batch {w['batch']}, {w['precision']}, {w['steps']} steps, "
                     f"median (min-max) of {w['repeat']} after warm-up; {m.get('cpu')} ({m.get('cores')} cores), {run.date}")
        peak = m.get("peak", {})
        if peak:
            notes.append(f"peak: {peak['derivation']}")
            notes.append(f"measured sgemm (numpy float32 2048^3): {m.get('sgemm_gflops')} GFLOP/s")
            if m.get("fma_ceiling_gflops"):
                notes.append(f"measured FMA ceiling: {m['fma_ceiling_gflops']} GFLOP/s ({m.get('fma_ceiling_how', '')})")
            elif m.get("fma_ceiling_how"):
                notes.append(f"FMA ceiling not measured: {m['fma_ceiling_how']}")
            if m.get("int8_ceiling_gops"):
                notes.append(f"measured int8 ceiling: {m['int8_ceiling_gops']} GOP/s ({m.get('int8_ceiling_how', '')})")
            elif m.get("int8_ceiling_how"):
                notes.append(f"int8 ceiling not measured: {m['int8_ceiling_how']}")
        if m.get("gpu"):
            dense = m.get("gpu_fp16_dense_tflops")
            notes.append(f"GPU: {m['gpu']}, dense fp16 peak " + (f"{dense} TFLOP/s (data sheet)" if dense else "not in sdfast's table"))
        for skip in run.skipped:
            notes.append(f"skipped {skip['backend']}: {skip['reason']}")
        for row in run.rows:
            if row.note:
                notes.append(f"{row.backend} {row.metric}: {row.note}")
    return notes


def render(runs: list[BenchRun], fmt: str) -> str:
    if fmt == "json":
        data = [r.to_json() for r in runs]
        return json.dumps(data[0] if len(data) == 1 else data, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for run in runs:
            w = run.workload
            for row in run.rows:
                writer.writerow([run.date, run.machine.get("cpu"), run.machine.get("cores"), w["model"], w["height"], w["width"],
                                 w["batch"], w["steps"], w["precision"], row.backend, row.metric, row.unit, row.median,
                                 row.p90, row.min, row.max, row.n, row.note])
        return out.getvalue().rstrip("\n")
    header, lines = _grid(runs)
    if fmt == "md":
        table = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
        table += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(table + [""] + [f"- {n}" for n in _footer(runs)])
    if fmt == "table":
        widths = [max(len(str(x)) for x in column) for column in zip(header, *lines)]
        fmt_line = lambda cells: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
        return "\n".join([fmt_line(header), "  ".join("-" * w for w in widths), *map(fmt_line, lines), "", *_footer(runs)])
    raise ConfigError(f"unknown format '{fmt}'; choose table, md, json or csv")


def merge(runs: list[BenchRun]) -> list[BenchRun]:
    """Runs from several machines side by side; they must be comparable (same model and size)."""
    keys = {tuple(r.workload[k] for k in ("model", "height", "width", "batch", "steps", "precision")) for r in runs}
    if len(keys) > 1:
        raise ConfigError(f"cannot merge runs of different workloads: {sorted(keys)}")
    return runs


def plot(runs: list[BenchRun], path: Path) -> Path:
    """Grouped bars: per-stage median latency (log scale) with min-max whiskers, one colour per backend."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install matplotlib") from None
    columns = _columns(runs)
    stages = [s for s in STAGES if any(run.value(b, s) for run, b, _ in columns)]
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(stages) * max(1, len(columns)) / 2), 4.5))
    width = 0.8 / max(1, len(columns))
    for index, (run, backend, heading) in enumerate(columns):
        rows = [run.value(backend, s) for s in stages]
        xs = [i + index * width for i, r in enumerate(rows) if r]
        medians = [r.median for r in rows if r]
        errors = [[r.median - (r.min if r.min is not None else r.median) for r in rows if r],
                  [(r.max if r.max is not None else r.median) - r.median for r in rows if r]]
        axis.bar(xs, medians, width, yerr=errors, capsize=2, label=heading)
    axis.set_xticks([i + width * (len(columns) - 1) / 2 for i in range(len(stages))], [METRICS[s][1] for s in stages], rotation=15)
    axis.set_yscale("log")
    axis.set_ylabel("ms (median, min-max)")
    w = runs[0].workload
    axis.set_title(f"sdfast bench: {w['model']} {w['width']}x{w['height']}, batch {w['batch']}, {w['precision']}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=120)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot write the plot '{path}': {error}") from None
    finally:
        plt.close(figure)
    return path
