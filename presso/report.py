"""``CompiledModel.report()``: a plain dict for programs (``json.dumps`` takes it as it is) that
prints as tables for people: the totals, the op histogram, one row per compressed layer (method,
rank / bits / N:M, bytes before and after, error) and the pass timings. The ``presso`` command
prints the same text."""
from __future__ import annotations


class Report(dict):
    """A dict whose ``str()`` is a readable table; ``repr()`` stays the dict's."""

    def __str__(self) -> str:
        return format_report(self)


def table(rows, headers) -> str:
    """Left-aligned columns under a header and a rule."""
    widths = [max(len(str(r[i])) for r in list(rows) + [headers]) for i in range(len(headers))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*["-" * w for w in widths])] + [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def layer_method(layer: dict) -> str:
    """The passes that compressed a layer, in the order they ran, each with its method
    (``lowrank(whitened) + quantize(gptq)``)."""
    names = {"rank": lambda l: f"lowrank({l['lowrank_method']})" if "lowrank_method" in l else "lowrank",
             "kv_rank": lambda l: "kv_cache",
             "bits": lambda l: f"quantize({l['method']})" if "method" in l else "quantize",
             "nm": lambda l: f"sparsify({l['sparsity_method']})" if "sparsity_method" in l else "sparsify"}
    return " + ".join(names[k](layer) for k in layer if k in names)


def layer_form(layer: dict) -> str:
    """What is stored: rank, bits (and group size), N:M pattern, latent KV rank."""
    parts = []
    if "rank" in layer:
        parts.append(f"rank={layer['rank']}")
    if "kv_rank" in layer:
        parts.append(f"kv rank={layer['kv_rank']}/{layer.get('kv_rank_full', '?')}")
    if "bits" in layer:
        group = layer.get("group_size")
        parts.append(f"int{layer['bits']}" + (f" g{group}" if group else ""))
    if "nm" in layer:
        parts.append(layer["nm"])
    return " ".join(parts)


def compression_table(comp: dict) -> str:
    rows = [(l["layer"], layer_method(l), layer_form(l), f"{l.get('bytes_before', 0):,}", f"{l['bytes_after']:,}",
             f"{l['ratio']}x" if "ratio" in l else "", f"{l['rel_error']:.4f}" if "rel_error" in l else "")
            for l in comp["layers"]]
    return table(rows, ["layer", "method", "stored as", "bytes before", "bytes after", "ratio", "rel err"])


def format_report(rep: dict) -> str:
    t = rep["totals"]
    lines = [f"graph @{rep['graph']}: {t['nodes']} ops, {t['params']:,} params, {t['bytes']:,} bytes, "
             f"{t['flops'] / 1e9:.3f} GFLOPs" + (f", target {rep['target']}" if rep.get("target") else ""),
             "ops: " + ", ".join(f"{k}×{v}" for k, v in sorted(rep["ops"].items(), key=lambda kv: -kv[1]))]
    comp = rep.get("compression") or {}
    if comp.get("layers"):
        lines.append(compression_table(comp))
        if comp.get("compression_ratio"):
            lines.append(f"model: {comp['model_bytes_uncompressed']:,} -> {comp['model_bytes']:,} bytes "
                         f"(×{comp['compression_ratio']})")
    kv = rep.get("kv_cache")
    if kv:
        lines.append(f"kv cache: {kv['kv_cache_bytes_per_token']:,} bytes per token "
                     f"(uncompressed {kv['kv_cache_bytes_per_token_uncompressed']:,}), max_len {kv['max_len']}")
    if rep.get("passes"):
        lines.append("passes: " + ", ".join(f"{p['pass']} {p['seconds'] * 1e3:.1f} ms" for p in rep["passes"]))
    return "\n".join(lines)
