"""Real English text to measure language models on, taken from what every machine running presso
ships: the documentation strings of Python's own standard library, written by its authors.

Two disjoint sources: evaluation text comes from one set of modules and calibration text from
another, so a compression method calibrated on one is never scored on the text it saw. The text
depends only on the Python version (presso pins 3.11-3.12), so figures are reproducible."""
from __future__ import annotations

import importlib
import inspect
import re

EVALUATION_MODULES = ("argparse", "subprocess", "logging", "threading", "unittest", "csv", "zipfile",
                      "tarfile", "shutil", "pathlib", "sqlite3", "socket", "ssl", "email.message")
CALIBRATION_MODULES = ("collections", "functools", "itertools", "typing", "dataclasses", "asyncio", "json",
                       "pickle", "decimal", "fractions", "random", "statistics", "datetime", "calendar",
                       "textwrap", "difflib", "heapq", "bisect", "enum", "contextlib", "abc", "io", "os",
                       "tempfile", "http.client", "urllib.request", "xml.etree.ElementTree", "configparser")


def _docstrings(module_name: str):
    mod = importlib.import_module(module_name)
    yield inspect.getdoc(mod)
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        yield inspect.getdoc(obj)
        if inspect.isclass(obj):
            for mname, member in sorted(vars(obj).items()):
                if not mname.startswith("_") and callable(member):
                    yield inspect.getdoc(member)


def _is_prose(paragraph: str) -> bool:
    """Sentences, not code samples, tables or signatures."""
    if ">>>" in paragraph or paragraph.count("(") > 6 or len(paragraph) < 80:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in paragraph)
    return letters / len(paragraph) > 0.88 and "." in paragraph


def prose(modules) -> str:
    """The prose paragraphs of the docstrings of ``modules``, each once, in a fixed order."""
    seen, out = set(), []
    for name in modules:
        for doc in _docstrings(name):
            for para in re.split(r"\n\s*\n", doc or ""):
                para = " ".join(para.split())
                if para not in seen and _is_prose(para):
                    seen.add(para)
                    out.append(para)
    return "\n\n".join(out)


def evaluation_text() -> str:
    return prose(EVALUATION_MODULES)


def calibration_text() -> str:
    return prose(CALIBRATION_MODULES)
