"""What a run prints and keeps: the table of medians and ratios to the floor, what it ran on, the raw results."""

import collections
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gunicorn

from bench import ROOT
from bench.measure import Measurement
from bench.servers import ServerSpec

# The ratios to the floor the service must reach, by batch size, and its peak RSS.
GOALS = {1: 0.67, 10: 0.68, 100: 0.40}
RSS_GOAL_MIB = 64
# The nats sink's events/s over the stdout sink's (the same service otherwise), by batch size.
NATS_GOALS = {1: 0.5, 10: 0.5, 100: 0.33}


def cost_model(points: dict[int, float]) -> tuple[float, float] | None:
    """Least-squares fit of µs per request = a + b * batch: (a, b), the fixed cost and the cost per event."""
    if len(points) < 2:
        return None
    slope, intercept = statistics.linear_regression(list(points), list(points.values()))
    return intercept, slope


def _goal(spec: ServerSpec, batch: int, ratio: float, goals: dict[int, float] = GOALS) -> str:
    """The goal the ratio is held to, and whether it is met; the floor, other sinks and variants (see
    ``comparison_lines``) have none here."""
    if spec.kind == "floor" or spec.sink != "stdout" or spec.variant or batch not in goals:
        return ""
    return f"≥ {goals[batch]:.2f} {'yes' if ratio >= goals[batch] else 'NO'}"


def _ratio(values: list[float]) -> str:
    """The median of paired ratios, with their range when there are several."""
    if not values:
        return "-"
    spread = f" ({min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""
    return f"{statistics.median(values):.2f}{spread}"


def summarize(
    measurements: list[Measurement], specs: Sequence[ServerSpec], batches: Sequence[int], repeats: int
) -> str:
    """The table: medians over repeats; ratios are to the floor at the same batch in the same repeat."""
    labels = [spec.label for spec in specs]
    by_label = {spec.label: spec for spec in specs}
    floor = {(m.batch, m.repeat): m for m in measurements if m.server == "floor"}
    groups: dict[tuple[str, int], list[Measurement]] = collections.defaultdict(list)
    for m in measurements:
        groups[(m.server, m.batch)].append(m)
    rows = [
        "| server | batch | requests/s | events/s | p50 ms | p99 ms | ratio to floor | goal "
        "| worker CPU µs/request | CPU ratio | CPU use: worker / others |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for label in labels:
        for batch in batches:
            runs = groups.get((label, batch), [])
            if not runs:
                continue
            pairs = [(m, floor[(batch, m.repeat)]) for m in runs if (batch, m.repeat) in floor]
            ratios = [m.rps / f.rps for m, f in pairs]
            ratio = statistics.median(ratios) if ratios else float("nan")
            rows.append(
                f"| {label} | {batch} | {statistics.median(m.rps for m in runs):,.0f} "
                f"| {statistics.median(m.eps for m in runs):,.0f} "
                f"| {statistics.median(m.wrk.p50_us for m in runs) / 1000:.2f} "
                f"| {statistics.median(m.wrk.p99_us for m in runs) / 1000:.2f} "
                f"| {_ratio(ratios)} | {_goal(by_label[label], batch, ratio)} "
                f"| {statistics.median(m.cpu_us for m in runs):,.0f} "
                f"| {_ratio([f.cpu_us / m.cpu_us for m, f in pairs])} "
                f"| {100 * statistics.median(m.busy for m in runs):.0f}% / "
                f"{100 * statistics.median(m.others for m in runs):.0f}% |"
            )
    lines = ["\n".join(rows), ""]
    lines.append(
        f"Medians of {repeats} repeat(s). Ratio: requests/s over the floor's at that batch in the same repeat "
        "(range over repeats in brackets). CPU ratio: the floor's worker CPU time per request over this one's, "
        "which other load on the machine disturbs less. CPU use: the share of the server CPU's time the worker used, "
        "and what other processes took (on a quiet machine, under 5%)."
    )
    costs = []
    for label in labels:
        present = [b for b in batches if groups.get((label, b))]
        wall = {b: 1e6 / statistics.median(m.rps for m in groups[(label, b)]) for b in present}
        cpu = {b: statistics.median(m.cpu_us for m in groups[(label, b)]) for b in present}
        models = [(kind, cost_model(points)) for kind, points in (("wall", wall), ("CPU", cpu))]
        text = "; ".join(f"{kind} {m[0]:.0f} µs per request + {m[1]:.2f} µs per event" for kind, m in models if m)
        if text:
            costs.append(f"- {label}: {text}")
    if costs:
        lines.append("Cost per request and per event, least squares over the batch sizes (wall from requests/s; CPU):")
        lines += costs
    return "\n".join(lines)


def comparison_lines(measurements: list[Measurement], specs: Sequence[ServerSpec], batches: Sequence[int]) -> list[str]:
    """Each service with another sink or a variant against its baseline (the same with the stdout sink, or without
    the variant's settings): events/s over events/s in the same repeat (median, range), against NATS_GOALS for the
    nats sink, and both p99s."""
    lines = []
    runs = {(m.server, m.batch, m.repeat): m for m in measurements}
    for spec in specs:
        if not spec.baseline:
            continue
        base = spec.baseline.label
        for batch in batches:
            pairs = [
                (m, runs[(base, batch, m.repeat)])
                for m in measurements
                if (m.server, m.batch) == (spec.label, batch) and (base, batch, m.repeat) in runs
            ]
            if not pairs:
                continue
            ratios = [m.eps / s.eps for m, s in pairs]
            goal = NATS_GOALS.get(batch) if spec.sink == "nats" and not spec.variant else None
            verdict = f", goal ≥ {goal:.2f}: {'yes' if statistics.median(ratios) >= goal else 'NO'}" if goal else ""
            lines.append(
                f"- {spec.label} over {base}, batch {batch}: events/s {_ratio(ratios)}{verdict}; "
                f"p99 {statistics.median(m.wrk.p99_us for m, _ in pairs) / 1000:.2f} ms against "
                f"{statistics.median(s.wrk.p99_us for _, s in pairs) / 1000:.2f} ms"
            )
    return lines


def progress_line(m: Measurement) -> str:
    """One run, as it is printed when it ends."""
    status = "; ".join(m.problems) or "ok"
    return (
        f"  repeat {m.repeat + 1} {m.server:32} batch {m.batch:4}: {m.rps:9,.0f} req/s "
        f"p50 {m.wrk.p50_us / 1000:6.2f} ms p99 {m.wrk.p99_us / 1000:6.2f} ms, "
        f"worker {100 * m.busy:3.0f}% others {100 * m.others:3.0f}% of its CPU, "
        f"{m.logged} written for {m.acknowledged} acked events: {status}"
    )


def memory_lines(memory: list[dict[str, Any]], rss_requests: int) -> list[str]:
    """The RSS burst's result for each server, one line each."""
    lines = []
    for entry in memory:
        status = "; ".join(entry["problems"]) or "ok"
        goal = "" if entry["server"] == "floor" else f" (goal < {RSS_GOAL_MIB} MiB)"
        lines.append(
            f"- {entry['server']}: peak RSS {entry['hwm_kib'] / 1024:.1f} MiB{goal} after {rss_requests} "
            f"bodies of 1 MiB ({entry['events']} events each); "
            f"{entry['rss_before_kib'] / 1024:.1f} MiB before them: {status}"
        )
    return lines


def code_version(code: Path = ROOT) -> str:
    """The commit, and a digest of the uncommitted changes to the service if there are any."""
    if not (code / ".git").exists():
        return f"{code} (not a git checkout)"
    git = ["git", "-C", str(code)]
    service = ["analytics", "app.py", "config.py", "gunicorn.conf.py", "wsgi.py"]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        changed = subprocess.run([*git, "status", "--porcelain", "--", *service], capture_output=True, text=True)
        diff = subprocess.run([*git, "diff", "HEAD", "--", *service], capture_output=True).stdout
    except OSError:
        return "?"
    if not changed.stdout:
        return head
    return f"{head} + {len(changed.stdout.splitlines())} changed files (diff {hashlib.sha1(diff).hexdigest()[:8]})"


def machine(code: Path = ROOT) -> dict[str, str]:
    """What the numbers were measured on."""
    model = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line), "")
    except (OSError, subprocess.SubprocessError):
        pass
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
    wrk_version = (wrk.stdout or wrk.stderr or "?").splitlines()[0].split(" [")[0]
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "gunicorn": gunicorn.__version__,
        "wrk": wrk_version,
        "kernel": platform.release(),
        "code": code_version(code),
    }


def load_average() -> str:
    """The 1/5/15-minute load average: the machine is shared, so say how busy it was."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def save(
    results: Path,
    info: dict[str, str],
    command: str,
    measurements: list[Measurement],
    memory: list[dict[str, Any]],
) -> None:
    """Keep the raw numbers in ``results`` (bench/results/, ignored by git) for later comparison."""
    try:
        results.mkdir(parents=True, exist_ok=True)
        path = results / f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}.json"
        record = {
            "command": command,
            "machine": info,
            "measurements": [asdict(m) | {"rps": m.rps} for m in measurements],
            "memory": memory,
        }
        path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"raw results: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    except OSError as error:
        print(f"could not save raw results: {error}", file=sys.stderr)
