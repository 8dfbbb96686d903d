"""The ``presso`` command: inspect, compile, show, diff, bench, eval and generate with models and artifacts.

MODEL is a ``.onnx`` file, a saved presso artifact (a directory), or ``package.module:factory``
where ``factory()`` returns ``(module, example_inputs)``. Errors print one line and exit 2
(``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from presso.report import format_report, table
from presso.targets import generation_targets, target_names

EXIT_USAGE = 2


class CLIError(Exception):
    """A user-facing error: printed as one line."""


def load_any(spec: str, with_torch: bool = False, key=None, trust_code: bool = False):
    """-> (CompiledModel or None, graph, example_inputs or None, torch module or None). An
    artifact is loaded with ``key`` and ``trust_code`` (see ``presso.load``)."""
    import presso
    from presso.runtime.artifact import read_manifest
    p = Path(spec)
    if p.is_dir():
        cm = presso.load(p, key=key, trust_code=trust_code)
        return cm, cm.graph, None, None
    if spec.endswith(".onnx"):
        if not p.exists():
            raise CLIError(f"no such file: {spec}")
        g = presso.import_model(str(p))
        inputs = tuple(_example(v.type) for v in g.inputs) if all(v.type.is_static for v in g.inputs) else None
        cm = presso.compile(g, example_inputs=inputs)
        return cm, cm.graph, inputs, None
    if ":" in spec and not p.exists():
        mod_name, _, fn_name = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise CLIError(f"cannot import factory {spec!r}: {e}") from None
        made = factory()
        if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module)):
            raise CLIError(f"factory {spec!r} must return (nn.Module, example_inputs)")
        module, inputs = made
        inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        cm = presso.compile(module, example_inputs=inputs)
        return cm, cm.graph, inputs, module
    if p.exists():
        read_manifest(p)  # raises a clear error for a file that is not an artifact
    raise CLIError(f"{spec!r} is not a .onnx file, a presso artifact directory, or package.module:factory")


def print_report(rep: dict, out=None) -> None:
    """Print the report table to ``out``, by default the ``sys.stdout`` of the moment (not the one
    at import, so that a caller's redirection holds)."""
    print(format_report(rep), file=out or sys.stdout)


def _artifact_opts(a) -> dict:
    """``--key-file`` (the key's bytes, a trailing newline dropped; default $PRESSO_ARTIFACT_KEY)
    and ``--trust-code``, for every command that loads an artifact."""
    key = None
    if getattr(a, "key_file", None):
        try:
            key = Path(a.key_file).read_bytes().rstrip(b"\r\n")
        except OSError as e:
            raise CLIError(f"cannot read the key file {a.key_file}: {e.strerror}") from None
    return {"key": key, "trust_code": bool(getattr(a, "trust_code", False))}


def cmd_inspect(a) -> int:
    cm, g, inputs, _ = load_any(a.model, **_artifact_opts(a))
    rep = cm.report()
    if a.json:
        print(json.dumps(rep, indent=1, default=str))
    elif a.ir:
        print(g)
    else:
        print_report(rep)
    return 0


def _load_calibration(path: str, n_inputs: int):
    """Samples from a safetensors file with keys ``<sample>.<input>``: every sample must give each
    of the model's ``n_inputs`` inputs exactly once (key ``0.1`` on a one-input model is an error,
    not input 0)."""
    from safetensors.torch import load_file
    if not os.path.exists(path):
        raise CLIError(f"no such calibration file: {path}")
    try:
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001
        raise CLIError(f"cannot read calibration file {path} (a .safetensors file with keys '<sample>.<input>'): {e}") from None
    samples: dict[int, dict[int, torch.Tensor]] = {}
    for key, t in tensors.items():
        try:
            i, j = (int(x) for x in key.split("."))
        except ValueError:
            raise CLIError(f"calibration key {key!r} must be '<sample>.<input>', e.g. '0.0'") from None
        samples.setdefault(i, {})[j] = t
    for i, s in sorted(samples.items()):
        if sorted(s) != list(range(n_inputs)):
            raise CLIError(f"calibration sample {i} has inputs {sorted(s)}, but the model takes {n_inputs} input(s): "
                           f"keys '{i}.0' .. '{i}.{n_inputs - 1}'")
    return [tuple(s[j] for j in range(n_inputs)) for _, s in sorted(samples.items())]


def cmd_compile(a) -> int:
    import presso
    from presso.passes.manager import resolve
    resolve(a.recipe or [])  # a malformed pipeline fails before anything is imported
    opts = _artifact_opts(a)
    _, g, inputs, module = load_any(a.model, **opts)
    calib = _load_calibration(a.calibration, len(g.inputs)) if a.calibration else None
    source = module if module is not None else g
    cm = presso.compile(source, target=a.target, example_inputs=inputs, recipe=a.recipe, calibration=calib,
                        check=a.check, print_ir_after=a.print_ir_after, verbose=not a.quiet)
    print_report(cm.report())
    if a.output:
        path = cm.save(a.output, overwrite=a.force, key=opts["key"])
        print(f"saved {path}")
    return 0


def _example(t):
    shape = t.concrete_shape({s: 1 for s in t.symbols})
    return torch.randn(shape).to(t.dtype.torch) if t.dtype.is_float else torch.ones(shape, dtype=t.dtype.torch)


def cmd_show(a) -> int:
    from presso import viz
    cm, g, inputs, _ = load_any(a.model, **_artifact_opts(a))
    rep = cm.report() if cm else None
    suffix = Path(a.output).suffix.lower()
    if suffix == ".html":
        text = viz.to_html(g, title=Path(a.model).name, report=rep)
    elif suffix == ".svg":
        text = viz.to_svg(g)
    elif suffix == ".dot":
        text = viz.to_dot(g)
    else:
        raise CLIError(f"output must end in .html, .svg or .dot, got {a.output!r}")
    out = Path(a.output)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)   # never another file
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"wrote {a.output} ({len(g.nodes)} ops)")
    return 0


def cmd_diff(a) -> int:
    ca, ga, _, _ = load_any(a.a, **_artifact_opts(a))
    cb, gb, _, _ = load_any(a.b, **_artifact_opts(a))
    ra, rb = ca.report(), cb.report()
    la = {l["layer"]: l for l in ra.get("compression", {}).get("layers", [])}
    lb = {l["layer"]: l for l in rb.get("compression", {}).get("layers", [])}
    rows = []
    for key in sorted(set(la) | set(lb)):
        x, y = la.get(key, {}), lb.get(key, {})
        desc = lambda l: " ".join(s for s in (f"r{l['rank']}" if "rank" in l else "", f"int{l['bits']}" if "bits" in l else "", l.get("nm", "")) if s) or "dense"  # noqa: E731
        size = lambda l, g: l.get("bytes_after", g.params[key].value.type.nbytes() if key in g.params else 0)  # noqa: E731
        if desc(x) != desc(y) or size(x, ga) != size(y, gb):
            rows.append((key, desc(x), desc(y), f"{size(x, ga):,}", f"{size(y, gb):,}",
                         f"{y.get('rel_error', 0) - x.get('rel_error', 0):+.4f}"))
    ops = sorted(set(ra["ops"]) | set(rb["ops"]))
    delta = {k: rb["ops"].get(k, 0) - ra["ops"].get(k, 0) for k in ops if rb["ops"].get(k, 0) != ra["ops"].get(k, 0)}
    print(f"A: {a.a}: {ra['totals']['nodes']} ops, {ra['totals']['bytes']:,} bytes")
    print(f"B: {a.b}: {rb['totals']['nodes']} ops, {rb['totals']['bytes']:,} bytes "
          f"({rb['totals']['bytes'] - ra['totals']['bytes']:+,} bytes)")
    print("op count changes: " + (", ".join(f"{k} {v:+d}" for k, v in delta.items()) or "none"))
    if rows:
        print(table(rows, ["layer", "A", "B", "bytes A", "bytes B", "Δ rel err"]))
    else:
        print("no layer differs")
    return 0


def cmd_bench(a) -> int:
    cm, g, inputs, _ = load_any(a.artifact, **_artifact_opts(a))
    if cm is None:
        raise CLIError("bench takes a saved artifact (presso compile ... -o DIR)")
    xs = [_example(v.type) for v in g.inputs]
    for _ in range(a.warmup):
        cm(*xs)
    times = []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        cm(*xs)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    spread = (statistics.quantiles(times, n=10)[0], statistics.quantiles(times, n=10)[-1]) if len(times) >= 2 else (med, med)
    rows = xs[0].shape[0] if xs and xs[0].dim() else 1
    print(f"{a.artifact}: target={cm.target} median {med * 1e3:.3f} ms (p10 {spread[0] * 1e3:.3f}, p90 {spread[1] * 1e3:.3f}) "
          f"over {a.iters} runs after {a.warmup} warm-up; {rows / med:.1f} samples/s")
    return 0


def _eval_tokens(a) -> torch.Tensor:
    """The token stream to score: ``--tokens`` (safetensors with key ``input_ids``) or ``--text``
    (a file, or ``python-docs`` for presso's shipped evaluation text) read with ``--tokenizer``."""
    if a.tokens:
        from safetensors.torch import load_file
        t = load_file(a.tokens)
        if "input_ids" not in t:
            raise CLIError(f"{a.tokens}: needs a tensor named 'input_ids', found {', '.join(t) or 'none'}")
        return t["input_ids"].reshape(-1)
    if not a.text:
        raise CLIError("eval needs --text FILE (with --tokenizer) or --tokens FILE")
    if a.text == "python-docs":
        from presso.eval import evaluation_text
        text = evaluation_text()
    else:
        if not os.path.isfile(a.text):
            raise CLIError(f"no such text file: {a.text}")
        text = Path(a.text).read_text(encoding="utf-8")
    if not a.tokenizer:
        raise CLIError("--text needs --tokenizer (a tokenizer.json file, a Hugging Face tokenizer folder, or a .gguf)")
    tok = a.tokenizer
    if tok.endswith(".json"):
        from tokenizers import Tokenizer
        return torch.tensor(Tokenizer.from_file(tok).encode(text).ids)
    import transformers
    path = Path(tok)
    kw = {"gguf_file": path.name} if tok.endswith(".gguf") else {}
    hf = transformers.AutoTokenizer.from_pretrained(path.parent if kw else path, **kw)
    return hf(text, return_tensors="pt").input_ids[0]


def cmd_eval(a) -> int:
    from presso.eval import perplexity
    cm, g, _, _ = load_any(a.model, **_artifact_opts(a))
    ids = _eval_tokens(a)
    seq = g.inputs[0].type.shape[-1] if g.inputs else None
    window = a.window or (seq if isinstance(seq, int) else 256)
    res = perplexity(cm, ids, window=window, stride=a.stride, max_windows=a.max_windows, batch_size=a.batch_size)
    if a.json:
        print(json.dumps({"perplexity": res.perplexity, "nll": res.nll, "tokens": res.tokens,
                          "windows": res.windows, "seconds": res.seconds, "window": window}))
    else:
        print(f"{a.model}: {res} (window {window})")
def _tokenizer(path):
    """The Hugging Face tokenizer saved in ``path``, or None where there is none."""
    p = Path(path)
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(p))


def _load_for_generation(a):
    """-> (CompiledModel compiled with ``generation=True``, tokenizer or None, default eos ids).
    MODEL is a Hugging Face causal LM folder (``save_pretrained``: its tokenizer comes with it), a
    saved artifact compiled for generation, or ``package.module:factory``."""
    import presso
    p = Path(a.model)
    calib = _load_calibration(a.calibration) if a.calibration else None
    compile_kw = dict(target=a.target, recipe=a.recipe, calibration=calib, generation=True, max_len=a.max_len)
    tok, eos = None, None
    if p.is_dir() and (p / "config.json").exists():
        import transformers
        transformers.utils.logging.disable_progress_bar()
        model = transformers.AutoModelForCausalLM.from_pretrained(str(p)).eval()
        ids = torch.randint(0, model.config.vocab_size, (2, 8))
        limit = getattr(model.config, "max_position_embeddings", None)
        compile_kw["max_len"] = min(a.max_len, limit) if limit else a.max_len
        cm = presso.compile(model, example_inputs=(ids,), **compile_kw)
        tok, eos = _tokenizer(p), model.generation_config.eos_token_id
    elif p.is_dir():
        cm = presso.load(p, **_artifact_opts(a))
    elif ":" in a.model and not p.exists():
        _, _, inputs, module = load_any(a.model)
        cm = presso.compile(module, example_inputs=inputs, **compile_kw)
    else:
        raise CLIError(f"{a.model!r} is not a Hugging Face model folder, a presso artifact directory, "
                       "or package.module:factory")
    if a.tokenizer:
        tok = _tokenizer(a.tokenizer)
        if tok is None:
            raise CLIError(f"no tokenizer in {a.tokenizer} (tokenizer.json or tokenizer_config.json)")
    if eos is None and tok is not None:
        eos = tok.eos_token_id
    return cm, tok, eos


def _prompts(a, tok) -> list[list[int]]:
    prompts = []
    for text in a.prompt or []:
        if tok is None:
            raise CLIError(f"{a.model} has no tokenizer to read --prompt text: give --tokenizer DIR, or token ids "
                           "with --prompt-ids")
        prompts.append(tok(text)["input_ids"])
    for ids in a.prompt_ids or []:
        try:
            prompts.append([int(x) for x in ids.replace(",", " ").split()])
        except ValueError:
            raise CLIError(f"--prompt-ids takes token ids separated by commas or spaces, got {ids!r}") from None
    return prompts


class _Printer:
    """Prints one sequence's new tokens as they come: what the text of prompt and new tokens
    gained with each token (so spacing is the tokenizer's, and tokens that only make sense
    together print once complete), or their ids without a tokenizer."""

    def __init__(self, tok, prompt: list[int], out):
        self.tok, self.prompt, self.out, self.ids = tok, prompt, out, []
        self.shown = self._text()
        out.write(self.shown)

    def _text(self) -> str:
        ids = self.prompt + self.ids
        return self.tok.decode(ids, skip_special_tokens=True) if self.tok is not None else " ".join(map(str, ids))

    def __call__(self, tokens: torch.Tensor) -> None:
        self.ids.append(int(tokens[0]))
        text = self._text()
        self.out.write(text[len(self.shown):] if text.startswith(self.shown) else "\n" + text)
        self.shown = text
        self.out.flush()


def _sampling_options(a, eos) -> dict:
    opts = dict(do_sample=a.do_sample, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                repetition_penalty=a.repetition_penalty, seed=a.seed, max_time=a.max_time)
    eos = a.eos_token_id if a.eos_token_id is not None else eos
    if eos is not None:
        opts["eos_token_id"] = eos
    if a.stop_ids:
        try:
            opts["stop_sequences"] = [[int(x) for x in s.replace(",", " ").split()] for s in a.stop_ids]
        except ValueError:
            raise CLIError(f"--stop-ids takes token ids separated by commas or spaces, got {a.stop_ids}") from None
    return opts


def cmd_generate(a) -> int:
    from presso.runtime.sampling import check_options
    check_options(a.max_new_tokens, **_sampling_options(a, None))     # bad options fail before any loading
    if not (a.prompt or a.prompt_ids):
        raise CLIError("give a prompt: --prompt TEXT (with a tokenizer) or --prompt-ids IDS")
    cm, tok, eos = _load_for_generation(a)
    prompts = _prompts(a, tok)
    opts = _sampling_options(a, eos)
    show = (lambda ids: tok.decode(ids, skip_special_tokens=True)) if tok is not None else \
        (lambda ids: " ".join(map(str, ids)))
    t0 = time.perf_counter()
    if len(prompts) == 1:             # one sequence: its tokens print as they come
        printer = _Printer(tok, prompts[0], sys.stdout)
        cm.generate([torch.tensor(prompts[0])], a.max_new_tokens, streamer=printer, **opts)
        sys.stdout.write("\n")
        count = len(printer.ids)
    else:                             # a ragged batch, printed once done
        rows = cm.generate([torch.tensor(p) for p in prompts], a.max_new_tokens, **opts)
        for i, (p, r) in enumerate(zip(prompts, rows)):
            print(f"[{i}] {show(r.tolist())}")
        count = sum(len(r) - len(p) for p, r in zip(prompts, rows))
    seconds = time.perf_counter() - t0
    print(f"{count} tokens in {seconds:.2f} s ({count / seconds:.1f} tokens/s, target {cm.target})", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="presso", description="presso: a compiler for compressed neural networks")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)
    art = argparse.ArgumentParser(add_help=False)
    art.add_argument("--key-file", dest="key_file", help="file holding the artifact key: artifacts loaded must be "
                     "signed with it, and compile -o signs with it (default: $PRESSO_ARTIFACT_KEY)")
    art.add_argument("--trust-code", dest="trust_code", action="store_true",
                     help="load the native code of an artifact no key authenticates (it runs as it is loaded)")
    s = sub.add_parser("inspect", help="summary of a model or artifact", parents=[art])
    s.add_argument("model")
    s.add_argument("--ir", action="store_true", help="print the IR text")
    s.add_argument("--json", action="store_true", help="machine-readable report")
    s.set_defaults(fn=cmd_inspect)
    s = sub.add_parser("compile", help="run a pipeline and save an artifact", parents=[art])
    s.add_argument("model")
    s.add_argument("--target", default="reference", help=f"one of {', '.join(target_names())}")
    s.add_argument("--recipe", default=None, help='pipeline text, e.g. "quantize{weights=int4,group_size=128}"')
    s.add_argument("--calibration", help="safetensors file with keys '<sample>.<input>'")
    s.add_argument("-o", "--output", help="artifact directory to write")
    s.add_argument("--force", action="store_true",
                   help="replace an existing presso artifact at -o (never another file or folder)")
    s.add_argument("--print-ir-after", dest="print_ir_after", default=None)
    s.add_argument("--check", choices=["numeric"], default=None)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.set_defaults(fn=cmd_compile)
    s = sub.add_parser("show", help="draw the graph (.html, .svg or .dot)", parents=[art])
    s.add_argument("model")
    s.add_argument("-o", "--output", required=True)
    s.set_defaults(fn=cmd_show)
    s = sub.add_parser("diff", help="compare two graphs or artifacts", parents=[art])
    s.add_argument("a")
    s.add_argument("b")
    s.set_defaults(fn=cmd_diff)
    s = sub.add_parser("bench", help="latency of a saved artifact", parents=[art])
    s.add_argument("artifact")
    s.add_argument("--iters", type=int, default=20)
    s.add_argument("--warmup", type=int, default=3)
    s.set_defaults(fn=cmd_bench)
    s = sub.add_parser("eval", help="perplexity on a text (token windows)", parents=[art])
    s.add_argument("model")
    s.add_argument("--text", help="text file to score, or 'python-docs' (presso's shipped evaluation text)")
    s.add_argument("--tokenizer", help="tokenizer.json, a Hugging Face tokenizer folder, or a .gguf file")
    s.add_argument("--tokens", help="safetensors file with the token ids as 'input_ids' (instead of --text)")
    s.add_argument("--window", type=int, default=None, help="tokens per window (default: the model's static "
                   "sequence length, else 256)")
    s.add_argument("--stride", type=int, default=None, help="window step (default: the window; less slides)")
    s.add_argument("--max-windows", dest="max_windows", type=int, default=None)
    s.add_argument("--batch-size", dest="batch_size", type=int, default=1, help="windows per call")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_eval)
    s = sub.add_parser("generate", help="generate text with a causal LM, printing tokens as they come", parents=[art])
    s.add_argument("model", help="a Hugging Face model folder, an artifact compiled with generation, or module:factory")
    s.add_argument("--prompt", action="append", help="prompt text (needs a tokenizer); repeat for a batch")
    s.add_argument("--prompt-ids", dest="prompt_ids", action="append", help="prompt token ids, e.g. '1,2,3'")
    s.add_argument("--tokenizer", help="folder of a Hugging Face tokenizer (default: the model folder's)")
    s.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=32)
    s.add_argument("--max-len", dest="max_len", type=int, default=128,
                   help="KV-cache length, when compiling (at most a Hugging Face model's max_position_embeddings)")
    s.add_argument("--target", default="reference",
                   help="a target that can generate: " + ", ".join(generation_targets()))
    s.add_argument("--recipe", default=None)
    s.add_argument("--calibration", help="safetensors file with keys '<sample>.<input>' (for the recipe)")
    s.add_argument("--do-sample", dest="do_sample", action="store_true")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", dest="top_k", type=int, default=0)
    s.add_argument("--top-p", dest="top_p", type=float, default=1.0)
    s.add_argument("--repetition-penalty", dest="repetition_penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--eos-token-id", dest="eos_token_id", type=int, default=None,
                   help="default: the model's or the tokenizer's")
    s.add_argument("--stop-ids", dest="stop_ids", action="append", help="a stop sequence of token ids; repeatable")
    s.add_argument("--max-time", dest="max_time", type=float, default=None, help="seconds")
    s.set_defaults(fn=cmd_generate)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - every error becomes one line unless --debug
        if args.debug:
            raise
        from presso.errors import PressoError
        kind = type(e).__name__
        msg = str(e).strip().splitlines()[0] if str(e).strip() else kind
        if not isinstance(e, (PressoError, CLIError, ValueError, FileNotFoundError)):
            msg = f"internal error ({kind}): {msg} (rerun with --debug for the traceback)"
        print(f"presso: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
