"""`make demo` tells the headline story and every step succeeds: audit -> graft -> check ->
verify (PASS) -> run -> pack, on the tiny Mistral-style donor and its Q4_K recipient."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_demo_runs_end_to_end():
    p = subprocess.run([sys.executable, "-m", "fixtures.demo"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    for step in ("audit", "graft", "check", "verify", "run", "pack"):
        assert f"$ ggraft {step} " in p.stdout, step
    assert "Pixtral / Mistral (3 of 3 tokens)" in p.stdout
    assert "PASS:" in p.stdout and "FAIL" not in p.stdout
    assert "packed tiny-devstral for Ollama" in p.stdout
