"""Bench results as JSON (the record), a markdown table (for docs) and a PNG plot (for people).

A report holds one or more runs, one per server; reports from separate invocations merge, so servers
measured one at a time on the same machine end up side by side.
"""

from __future__ import annotations

import os
import platform
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from fastllm.bench.summary import LevelSummary
from fastllm.errors import BenchError, MissingExtraError


class BenchRun(msgspec.Struct):
    label: str
    base_url: str
    model: str
    mode: str  # "chat" (x = concurrency, tokens = generated) or "embeddings" (x = batch size, tokens = inputs)
    max_tokens: int
    repeat: int
    levels: list[LevelSummary]
    x_label: str = "concurrency"


class Machine(msgspec.Struct):
    cores: int | None
    cpu: str
    system: str
    python: str

    @classmethod
    def here(cls) -> Machine:
        cpu = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        return cls(cores=os.cpu_count(), cpu=cpu, system=f"{platform.system()} {platform.release()}",
                   python=platform.python_version())


class Report(msgspec.Struct):
    machine: Machine
    created: str
    runs: list[BenchRun]

    @classmethod
    def new(cls, runs: list[BenchRun]) -> Report:
        return cls(machine=Machine.here(), created=datetime.now(UTC).isoformat(timespec="seconds"), runs=runs)


def read_report(path: Path) -> Report:
    try:
        return msgspec.json.decode(path.read_bytes(), type=Report)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BenchError(f"{path} is not a bench report: {exc}") from exc


def write_json(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2) + b"\n")


def _cell(value: float | None) -> str:
    return "–" if value is None else f"{value:g}"


def markdown(report: Report) -> str:
    """One table per mode; a row per server and level, so the eye compares down a column."""
    lines = [f"Machine: {report.machine.cpu}, {report.machine.cores} cores, {report.machine.system}; "
             f"measured {report.created}. Figures are comparable only within one run on one machine.", ""]
    for mode in ("chat", "embeddings"):
        runs = [r for r in report.runs if r.mode == mode]
        if not runs:
            continue
        if mode == "chat":
            lines += [
                "| server | clients | req/s | gen tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms "
                "| e2e p50 ms | e2e p95 ms | tokens/req | errors |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for run in runs:
                for lv in run.levels:
                    lines.append(
                        f"| {run.label} | {lv.concurrency} | {lv.req_s:g} | {lv.tok_s:g} | {_cell(lv.ttft_p50_ms)} "
                        f"| {_cell(lv.ttft_p95_ms)} | {_cell(lv.itl_p50_ms)} | {_cell(lv.itl_p95_ms)} "
                        f"| {_cell(lv.e2e_p50_ms)} | {_cell(lv.e2e_p95_ms)} | {_cell(lv.tokens_per_request)} "
                        f"| {lv.errors}/{lv.requests} |"
                    )
        else:
            lines += ["| server | batch size | inputs/s | requests/s | e2e p50 ms | e2e p95 ms | errors |",
                      "|---|---|---|---|---|---|---|"]
            for run in runs:
                for lv in run.levels:
                    lines.append(f"| {run.label} | {lv.concurrency} | {lv.tok_s:g} | {lv.req_s:g} "
                                 f"| {_cell(lv.e2e_p50_ms)} | {_cell(lv.e2e_p95_ms)} | {lv.errors}/{lv.requests} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: Report, path: Path) -> None:
    """Throughput and latency against concurrency, one line per server (embeddings get their own row)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingExtraError("bench", "matplotlib") from exc
    chat = [r for r in report.runs if r.mode == "chat"]
    embed = [r for r in report.runs if r.mode == "embeddings"]
    panels: list[tuple[list[BenchRun], str, str, str]] = []
    if chat:
        panels += [(chat, "tok_s", "generated tokens/s (all clients)", "Throughput"),
                   (chat, "ttft_p50_ms", "time to first token p50 (ms)", "Time to first token"),
                   (chat, "itl_p50_ms", "inter-token latency p50 (ms)", "Inter-token latency")]
    if embed:
        panels += [(embed, "tok_s", "inputs/s", "Embeddings throughput")]
    if not panels:
        raise BenchError("the report has no runs to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (runs, key, ylabel, title) in zip(axes[0], panels, strict=True):
        for run in runs:
            xs = [lv.concurrency for lv in run.levels if getattr(lv, key) is not None]
            ys = [getattr(lv, key) for lv in run.levels if getattr(lv, key) is not None]
            ax.plot(xs, ys, marker="o", label=run.label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({lv.concurrency for r in runs for lv in r.levels}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel(runs[0].x_label)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.machine.cpu}, {report.machine.cores} cores — comparable only within one run", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
