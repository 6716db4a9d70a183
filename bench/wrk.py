"""Driving wrk: the Lua script that POSTs a prepared body and prints wrk's summary as JSON, and reading it back.

Every request carries ids of its own: the script replaces each event's ``id`` in
the prepared body with one made of a token given to that wrk run, the thread,
the request's number and the event's place (36 characters, as the UUIDs they
replace). A stream sink stores a repeated id once (a duplicate), so the same
ids every request would measure nothing; every server gets the same script, so
the comparison stays even.
"""

import json
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from bench import BenchError

WRK_MARK = "BENCH_RESULT "

WRK_SCRIPT = """\
-- Written by bench/run.py: POST one prepared body; report the summary as one JSON line.
local file = assert(io.open(__BODY__, "rb"))
local body = file:read("*a")
file:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
__HEADERS__
-- The body cut around each event's id: pieces[1], id 1, pieces[2], ..., id n, pieces[n + 1].
local pieces, from = {}, 1
for before, after in body:gmatch('()"id":"[^"]*"()') do
  pieces[#pieces + 1] = body:sub(from, before - 1)
  from = after
end
pieces[#pieces + 1] = body:sub(from)
local threads, count, token, sent = 0, #pieces - 1, "0000000000000000", 0

function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end

function init(args)
  token = args[1] or token
end

function request()
  sent = sent + 1
  local parts = {}
  for i = 1, count do
    parts[#parts + 1] = pieces[i]
    parts[#parts + 1] = string.format('"id":"%s-%02d-%012d-%03d"', token, thread_number or 0, sent, i)
  end
  parts[#parts + 1] = pieces[count + 1]
  return wrk.format(nil, nil, nil, table.concat(parts))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "__MARK__{\\"requests\\": %d, \\"duration_us\\": %d, \\"bytes\\": %d, \\"status_errors\\": %d, "
      .. "\\"connect_errors\\": %d, \\"read_errors\\": %d, \\"write_errors\\": %d, \\"timeouts\\": %d, "
      .. "\\"p50_us\\": %d, \\"p90_us\\": %d, \\"p99_us\\": %d, \\"max_us\\": %d}\\n",
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


@dataclass
class WrkResult:
    """wrk's summary of one run."""

    requests: int
    duration_us: int
    bytes: int
    status_errors: int
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int

    @property
    def rps(self) -> float:
        return self.requests / (self.duration_us / 1e6)

    @property
    def socket_errors(self) -> int:
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts


def wrk_script(body_path: Path, headers: dict[str, str] | None = None) -> str:
    """The Lua script that POSTs the body in ``body_path`` and prints the summary line."""
    lines = [f"wrk.headers[{json.dumps(key)}] = {json.dumps(value)}" for key, value in (headers or {}).items()]
    return (
        WRK_SCRIPT.replace("__BODY__", json.dumps(str(body_path)))
        .replace("__HEADERS__", "\n".join(lines))
        .replace("__MARK__", WRK_MARK)
    )


def parse_wrk(output: str) -> WrkResult:
    """wrk's summary from the line the script's ``done`` hook printed."""
    for line in output.splitlines():
        if line.startswith(WRK_MARK):
            return WrkResult(**json.loads(line[len(WRK_MARK) :]))
    raise BenchError(f"no summary in wrk's output:\n{output}")


def run_wrk(url: str, script: Path, duration: int, threads: int, connections: int, cpu: int | None) -> WrkResult:
    """Run wrk against ``url`` for ``duration`` seconds, pinned to ``cpu`` if given; its ids unlike any run's."""
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "10s"]
    command += ["-s", str(script), url, "--", uuid.uuid4().hex[:16]]
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse_wrk(done.stdout)
