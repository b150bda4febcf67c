"""Put the output of the last benchmark runs (benchmarks/.work/results/<name>.txt, written by
`make bench`) into the README's Performance section, between
``<!-- bench:<name>:start -->`` and ``<!-- bench:<name>:end -->``."""
from __future__ import annotations

import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / ".work" / "results"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or "?"
    mem = next((int(line.split()[1]) // 2**20 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0) if Path("/proc/meminfo").exists() else 0
    return f"{cores} cores of {cpu}, {mem} GiB, {platform.system()} {platform.machine()}"


def main() -> None:
    text = README.read_text()
    for result in sorted(RESULTS.glob("*.txt")):
        name = result.stem
        start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
        body = "\n".join(ln for ln in result.read_text().splitlines() if "\r" not in ln).strip()
        block = f"{start}\nLast `make bench` on {machine()}:\n\n```text\n{body}\n```\n{end}"
        text, n = re.subn(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
        print(f"{name}: {'updated' if n else 'no markers in README'}")
    README.write_text(text)


if __name__ == "__main__":
    main()
