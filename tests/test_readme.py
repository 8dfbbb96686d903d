"""Every snippet of README.md and docs/*.md runs verbatim.

Extraction rules (keep them this simple, so that any section added later is covered as it is):

* A fenced block opened with ```` ```python ```` is one Python snippet. It runs on its own, as a
  script in a fresh temporary directory (its working directory), with this checkout's presso
  first on the path. It must not rely on another block: no free variables, no ``...``.
* In any other fenced block (```` ``` ````, ```` ```bash ````, ```` ```sh ````, ```` ```console ````),
  each line that starts with ``presso `` (after an optional ``$ ``) is a CLI line. The CLI lines of
  one block run in order in one fresh temporary directory (so a later line may read what an
  earlier one wrote), as ``python -m presso ...``; a ``# comment`` at the end of a line is dropped.
  Every other line of such blocks (IR text, tables, ``pip install``) is not run.
* A block whose first line holds ``# needs a GPU``, or a CLI line ending with it, is skipped on a
  machine where torch sees no GPU (and run where it does); a Python block whose first line holds
  ``# needs gcc-aarch64-linux-gnu`` is skipped where that cross compiler is missing.

Each snippet and each CLI line must exit with status 0. A test is named by file and section
heading (``README.md: Compression``, then `` #2`` for a second block of one section); those that
take over ~20 s are listed in ``SLOW`` by that name, marked ``slow`` and left out of the fast
subset (``pytest -m "not slow"``).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
GPU_MARK = "# needs a GPU"
ARM_MARK = "# needs gcc-aarch64-linux-gnu"
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
SLOW = {"README.md: The command line", "README.md: Generation and KV-cache compression (Palu)",
        "README.md: Generation and KV-cache compression (Palu) #2", "README.md: Real LLMs: perplexity (`presso.eval`)",
        "README.md: Hugging Face models, as they are", "README.md: Targets",
        "README.md: Generation on CPUs and Arm boards"}


def doc_files() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def blocks(path: Path):
    """(section heading, language, lines) of each fenced block of ``path``."""
    lines = path.read_text().splitlines()
    i, heading = 0, "(top)"
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            if lines[i].startswith("#"):
                heading = lines[i].lstrip("#").strip()
            i += 1
            continue
        indent, lang = m.group(1), m.group(2).lower()
        body = []
        i += 1
        while i < len(lines) and not re.match(rf"^{re.escape(indent)}```\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        yield heading, lang, body


def cli_line(line: str) -> list[str] | None:
    """The arguments of a ``presso ...`` line (comments dropped), or None for any other line."""
    text = line.strip()
    text = text[2:] if text.startswith("$ ") else text
    if not text.startswith("presso "):
        return None
    return shlex.split(text, comments=True)[1:]


def snippets():
    out = []
    for path in doc_files():
        rel = path.relative_to(ROOT).as_posix()
        seen: dict[str, int] = {}
        for heading, lang, body in blocks(path):
            where = f"{rel}: {heading}"
            seen[where] = seen.get(where, 0) + 1
            where += f" #{seen[where]}" if seen[where] > 1 else ""
            gpu = bool(body) and GPU_MARK in body[0]
            if lang == "python":
                out.append(pytest.param("python", "\n".join(body) + "\n", gpu, id=where, marks=_marks(where)))
            elif lang in ("", "bash", "sh", "shell", "console"):
                cmds = [(cli_line(l), GPU_MARK in l) for l in body if cli_line(l) is not None]
                if cmds:
                    out.append(pytest.param("cli", cmds, gpu, id=where, marks=_marks(where)))
    return out


def _marks(where: str):
    return [pytest.mark.slow] if where in SLOW else []


def run(args: list[str], cwd: Path, timeout: int = 1500) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_docs_have_snippets():
    kinds = [p.values[0] for p in snippets()]
    assert kinds.count("python") >= 5 and kinds.count("cli") >= 1


@pytest.mark.parametrize("kind, code, gpu", snippets())
def test_snippet_runs_verbatim(kind, code, gpu, tmp_path):
    if gpu and not torch.cuda.is_available():
        pytest.skip("marked '# needs a GPU'")
    if kind == "python" and ARM_MARK in code.splitlines()[0] and shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip(f"marked '{ARM_MARK}' and the cross compiler is not installed")
    if kind == "python":
        assert "..." not in code, "a snippet must not hold a literal '...'"
        (tmp_path / "snippet.py").write_text(code)
        r = run(["snippet.py"], tmp_path)
        assert r.returncode == 0, f"snippet failed:\n{code}\n--- stderr ---\n{r.stderr[-3000:]}"
        return
    for args, needs_gpu in code:
        if needs_gpu and not torch.cuda.is_available():
            continue
        r = run(["-m", "presso", *args], tmp_path)
        assert r.returncode == 0, f"presso {shlex.join(args)} failed:\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
