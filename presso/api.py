"""``presso.compile``: import a model, run a pass pipeline, hand it to a target's runtime."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

import torch

from .errors import DimRangeError, MaxLenError, PressoError, TargetUnavailableError
from .ir.analysis import compression_report, cost_report
from .ir.graph import Graph
from .runtime.mutation import apply_input_mutations
from .passes.manager import PassContext, resolve, run_pipeline
from .deps import require
from .report import Report
from .ir.interpret import bind_inputs
from .targets import get_target


class CompiledModel:
    """A compiled graph bound to a target. Callable with the model's inputs; ``.graph`` is the IR,
    ``.code`` what the target compiled it to (None for the reference target)."""

    def __init__(self, graph: Graph, target: str, records=(), example_inputs=None, device="cpu", code=None):
        self.graph = graph
        self.target = target
        self.pass_records = list(records)
        if example_inputs is not None:    # kept in the graph's meta: a loaded artifact reports at the same shapes
            graph.meta["example_bindings"] = bind_inputs(graph, example_inputs)
        self._bindings = dict(graph.meta.get("example_bindings", {}))
        self._target = get_target(target)
        self.code = code if code is not None else self._target.build(graph)
        self._runtime = self._target.runtime(graph, self.code, device)

    @property
    def _build(self):
        """The compiled code (the name tests and tools have used for a TVM build)."""
        return self.code

    def __call__(self, *inputs: torch.Tensor, **kw_inputs: torch.Tensor):
        """Run on the model's inputs: positional, or by keyword for a model compiled with keyword
        example inputs. Outputs come back in the model's own structure (a ``ModelOutput``, dict or
        nested tuples; a single tensor or a tuple for a plain model). An HF ``DynamicCache`` output
        comes back as a ``DynamicCache`` holding the keys and values of the inputs just run (HF's
        pytree rebuilds it); the compiled model does not take a cache back as input: for
        step-by-step decoding compile with ``generation=True`` and call ``generate``."""
        if self._runtime is None:
            raise TargetUnavailableError(f"a model compiled for target {self.target!r} "
                                         f"{self._target.why_not_runnable()}", target=self.target)
        inputs = positional_inputs(self.graph, inputs, kw_inputs)
        outs = apply_input_mutations(self.graph.meta, inputs, self._runtime.run(*inputs))
        from .frontend.hf import restore_outputs
        return restore_outputs(self.graph.meta, list(outs))

    def report(self) -> Report:
        """Ops histogram, per-layer params/bytes/FLOPs (at the example input shapes), totals, pass timings:
        a dict, whose ``print()`` is a table (per compressed layer: method, rank / bits / N:M, bytes
        before and after, relative error)."""
        rep = Report(cost_report(self.graph, self._bindings))
        rep["target"] = self.target
        rep["frontend"] = self.graph.meta.get("frontend")
        rep["compression"] = compression_report(self.graph, self.graph.meta.get("uncompressed_bytes"))
        kv = self._kv_cache_report()
        if kv:
            rep["kv_cache"] = kv
        rep["passes"] = [{"pass": r.spec, "seconds": round(r.seconds, 6), "nodes_before": r.ops_before,
                          "nodes_after": r.ops_after, "max_rel_err": r.max_rel_err} for r in self.pass_records]
        return rep

    def _kv_cache_report(self) -> Optional[dict]:
        """KV-cache bytes per token, measured on the decode program's real (batch 1) buffers."""
        if "max_len" not in self.graph.meta:
            return None
        try:
            gen = self.decode_program()
        except PressoError:
            return None
        caches = gen.new_caches({"batch": 1})
        measured = gen.cache_bytes_per_token(caches, 1)
        return {"kv_cache_bytes_per_token": measured,
                "kv_cache_bytes_per_token_uncompressed": self.graph.meta.get("kv_cache_bytes_per_token_uncompressed",
                                                                             measured),
                "max_len": gen.max_len,
                "caches": {s.name: str(s.type) for s in gen.specs}}

    def decode_program(self, max_len: Optional[int] = None):
        """The prefill graph (symbolic ``seq``) and the single-token step graph, with their KV caches."""
        from .passes.decode import build_decode_graph, specialize
        from .runtime.generate import Generator
        compiled = self.graph.meta.get("max_len")
        max_len = max_len or compiled or 256
        if compiled is not None and max_len > compiled:
            raise MaxLenError(f"max_len={max_len} is beyond the max_len={compiled} this model was compiled with "
                              f"(the longest sequence it was traced for); compile with max_len={max_len}",
                              max_len, compiled)
        if getattr(self, "_generator", None) is None or self._generator.max_len != max_len:
            make_runtime = self._target.generation_runtime(self.code)
            graph, specs = build_decode_graph(self.graph, max_len)
            self._generator = Generator(graph, specialize(graph, {"seq": 1}), specs, max_len,
                                        make_runtime=make_runtime)
        return self._generator

    def generate(self, input_ids, max_new_tokens: int, max_len: Optional[int] = None, **options):
        """Generation with an explicit KV cache; returns prompt + new tokens (a list of prompts
        gives a list). ``input_ids`` is i64[batch, seq] (with ``attention_mask=`` for a
        left-padded batch) or a list of prompts of any lengths; greedy by default, or
        ``do_sample=True`` with ``temperature``, ``top_k``, ``top_p``, ``seed``; also
        ``repetition_penalty``, ``eos_token_id`` (an id or a list), ``pad_token_id``,
        ``stop_sequences`` (token-id lists), ``max_time`` (seconds) and ``streamer`` (a callable
        given each step's new tokens, or a transformers streamer). See ``presso.runtime.generate``."""
        gen = self.decode_program(max_len)
        out = gen.generate(input_ids, max_new_tokens, **options)
        self.kv_cache_bytes_per_token = gen.last_cache_bytes_per_token
        return out

    def generate_stream(self, input_ids, max_new_tokens: int, max_len: Optional[int] = None, **options):
        """``generate``'s new tokens as they come: an iterator of i64[batch] tensors, one per step
        (the arguments are ``generate``'s, checked before it returns)."""
        return self.decode_program(max_len).stream(input_ids, max_new_tokens, **options)

    def save(self, path, overwrite: bool = False, key=None):
        """Write an ahead-of-time artifact (see ``presso.runtime.artifact``); returns its path.
        ``key`` (bytes or str; default ``$PRESSO_ARTIFACT_KEY``) signs it with HMAC-SHA256, so
        that ``load(path, key=...)`` can tell it was not changed; without a key the artifact's
        hashes detect corruption only. ``overwrite=True`` replaces an existing presso artifact
        (never another file or folder); a crash leaves the old or the new artifact at ``path``."""
        from .runtime.artifact import save_artifact
        return save_artifact(self.graph, self._target, self.code, path, overwrite=overwrite, key=key)

    def __repr__(self):
        t = self.report()["totals"]
        return (f"CompiledModel(graph=@{self.graph.name}, target={self.target!r}, nodes={t['nodes']}, "
                f"params={t['params']}, bytes={t['bytes']})")


def positional_inputs(graph: Graph, args: Sequence, kwargs: dict) -> tuple:
    """``args`` then ``kwargs`` in graph input order; keywords name graph inputs (the keywords a
    model was compiled with, ``meta["input_names"]``, or the graph's input names)."""
    if not kwargs:
        return tuple(args)
    from .errors import InputError
    names = list(graph.meta.get("input_names") or [v.name for v in graph.inputs])
    kwargs = _drop_traced_constants(graph, kwargs)
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        raise InputError(f"unknown keyword input(s) {', '.join(unknown)}; @{graph.name} takes {', '.join(names)}")
    taken = names[:len(args)]
    twice = [k for k in kwargs if k in taken]
    if twice:
        raise InputError(f"input(s) {', '.join(twice)} given both by position and by keyword")
    missing = [k for k in names[len(args):] if k not in kwargs]
    if missing:
        raise InputError(f"missing input(s) {', '.join(missing)}; @{graph.name} takes {', '.join(names)}")
    return tuple(args) + tuple(kwargs[k] for k in names[len(args):])


def _drop_traced_constants(graph: Graph, kwargs: dict) -> dict:
    """Non-tensor keyword inputs (``use_cache=False``) were fixed when the model was traced: the
    same value may be passed again; another value would need another trace."""
    from .errors import InputError
    fixed = graph.meta.get("constant_inputs") or {}
    for k in [k for k in kwargs if k in fixed]:
        if kwargs[k] != fixed[k] or type(kwargs[k]) is not type(fixed[k]):
            raise InputError(f"keyword input {k}={kwargs[k]!r}: @{graph.name} was compiled with {k}={fixed[k]!r}, "
                             "a non-tensor input fixed at trace time; compile again to change it")
    return {k: v for k, v in kwargs.items() if k not in fixed}


def import_model(model, example_inputs=None, dynamic_shapes=None) -> Graph:
    """An nn.Module (needs example inputs), an onnx.ModelProto, a path to a .onnx file, or a Graph."""
    if isinstance(model, Graph):
        return model.copy()
    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise ValueError("compiling an nn.Module needs example_inputs=(tensor, ...)")
        from .frontend.torch_frontend import from_torch
        return from_torch(model, example_inputs, dynamic_shapes=dynamic_shapes)
    if isinstance(model, (str, os.PathLike, bytes)) or type(model).__name__ == "ModelProto":
        require("onnx", "onnx", "an ONNX model", load=False)
        from .frontend.onnx_frontend import from_onnx
        return from_onnx(model)
    raise ValueError(f"model must be an nn.Module, an onnx.ModelProto, a path to a .onnx file or a presso Graph; "
                     f"got {type(model).__name__}")


def compile(model, target: str = "reference", example_inputs: Optional[Sequence[torch.Tensor]] = None,
            recipe: Union[str, Sequence, None] = None, calibration=None, check: Optional[str] = None,
            print_ir_after=None, device: str = "cpu", dynamic_shapes=None, verbose: bool = True,
            generation: bool = False, max_len: int = 256) -> CompiledModel:
    """Compile ``model`` for ``target``. ``recipe`` is a pipeline (text or list) run after
    ``canonicalize``; ``check="numeric"`` verifies every pass against the reference runtime.
    ``calibration`` is an iterable of input tuples (what compression passes measure on), or of
    keyword dicts for a model compiled with keyword example inputs;
    ``dynamic_shapes`` (torch.export's) makes dims symbolic, e.g. ``({0: Dim("batch")},)``.
    ``generation=True`` (causal LMs taking ``input_ids``) makes batch and sequence symbolic so
    that ``CompiledModel.generate`` can run prefill and decode steps over a ``max_len`` KV cache.
    ``example_inputs`` may be a dict of keyword inputs (``{"input_ids": ..., "attention_mask": ...}``,
    the natural form for Hugging Face models); the compiled model then takes the same keywords.
    A Hugging Face causal LM is compiled as it is; with ``generation=True`` presso traces it as
    ``input_ids -> logits`` with causal SDPA (``presso.frontend.hf``), so that ``generate`` gives the
    tokens of HF's ``generate(do_sample=False)``. Long loops (calibration, GPTQ and SVD per layer)
    show progress bars on stderr once they have run a few seconds; ``verbose=False`` silences them."""
    tgt = get_target(target)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    specs = resolve(recipe or [])   # validate the recipe before any expensive import
    tgt.check_available()           # a missing package or GPU: say so before any work
    if not specs or specs[0].name != "canonicalize":
        specs = resolve(["canonicalize"]) + specs
    names = {s.name for s in specs}     # the target's passes, unless the recipe placed them
    specs = specs + [s for s in resolve(list(tgt.default_passes)) if s.name not in names]
    model_name = type(model).__name__
    if generation and isinstance(model, torch.nn.Module):
        from .frontend.hf import for_generation, is_causal_lm
        if is_causal_lm(model):
            if isinstance(example_inputs, dict):
                example_inputs = (example_inputs["input_ids"],) if "input_ids" in example_inputs else example_inputs
            model = for_generation(model, max_len)
        if dynamic_shapes is None:
            from torch.export import Dim
            dynamic_shapes = ({0: Dim("batch", min=1, max=1024), 1: Dim("seq", min=2, max=max_len)},)
    try:
        graph = import_model(model, example_inputs, dynamic_shapes)
    except DimRangeError as e:
        if not generation or e.dim != "seq":
            raise
        raise MaxLenError(f"max_len={max_len} is beyond the model's positions: {model_name} takes "
                          f"sequences of at most {e.limit} tokens (its position table); compile with "
                          f"max_len <= {e.limit}", max_len, e.limit) from None
    if isinstance(example_inputs, dict):
        example_inputs = positional_inputs(graph, (), {k: v for k, v in example_inputs.items()
                                                       if isinstance(v, torch.Tensor)})
    if generation:
        graph.meta["max_len"] = max_len
    from .passes.calibrate import normalize_samples
    if calibration is not None and hasattr(calibration, "__iter__") and not isinstance(calibration, (str, bytes, dict)):
        # keyword samples become positional, lazily: normalize_samples checks and bounds what it takes
        calibration = (positional_inputs(graph, (), {k: v for k, v in s.items() if isinstance(v, torch.Tensor)})
                       if isinstance(s, dict) else s for s in calibration)
    ctx = PassContext(example_inputs=example_inputs, calibration=normalize_samples(calibration), progress=verbose)
    graph, records = run_pipeline(graph, specs, ctx, check=check, print_ir_after=print_ir_after)
    return CompiledModel(graph, target, records, example_inputs, device)


def load(path, device: str = "cpu", key=None, trust_code: bool = False) -> CompiledModel:
    """Load an artifact written by ``CompiledModel.save``; every check runs before anything is
    parsed or run. With ``key`` (default ``$PRESSO_ARTIFACT_KEY``) the artifact must be signed
    with it and unchanged since (``ArtifactAuthError`` otherwise). Without a key a signed artifact
    is refused and an unsigned one is checked for corruption only, not authenticity; its native
    code (``llvm``/``aarch64`` ``code/model.so``, run as soon as it is opened) is then refused
    with ``UntrustedCodeError`` unless ``trust_code=True``."""
    from .runtime.artifact import load_artifact
    graph, target, code = load_artifact(path, key=key, trust_code=trust_code)
    return CompiledModel(graph, target.name, device=device, code=code)
