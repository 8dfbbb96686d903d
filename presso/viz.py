"""Pictures of a graph: a self-contained HTML page (no network), an SVG, or Graphviz DOT.

Nodes are coloured by op class; compressed layers carry their rank / bits / N:M; edges carry
tensor shapes. Nodes are grouped into blocks (layers) by their parameters' names
(``layers.3.mlp...`` -> block ``layers.3``); consecutive blocks with the same op sequence are
shown as one collapsible group, so a 24-layer model reads as "24 x the same block".
"""
from __future__ import annotations

import html
import json
import re
from collections import Counter

from .ir.graph import Graph, Node
from .ir.registry import get_op

COLORS = {"linear": "#4e79a7", "attention": "#9c6ade", "norm": "#59a14f", "elementwise": "#bab0ac",
          "layout": "#e8e2d9", "reduce": "#76b7b2", "compressed": "#f28e2b", "constant": "#ffffff",
          "misc": "#d4a6c8"}
_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def block_of(name: str) -> str | None:
    m = _BLOCK.match(name)
    return m.group(1) if m else None


def split_blocks(g: Graph) -> list[tuple[str, list[Node]]]:
    """Consecutive runs of nodes per block. A node's own params (read by it alone) name its block
    (``layers.3.…`` -> ``layers.3``, others -> top level); nodes without such params, or reading
    shared tables (RoPE cos/sin), join the block they follow."""
    users = g.users()
    blocks: list[tuple[str, list[Node]]] = []
    current = "(top)"
    for n in g.nodes:
        names = [v.name for n2 in [n] for v in _weight_params(n2) if len(users.get(v, [])) == 1]
        found = next((b for b in map(block_of, names) if b), None)
        if found is None and names:
            found = "(top)"
        if found is not None and found != current:
            current = found
        if not blocks or blocks[-1][0] != current:
            blocks.append((current, []))
        blocks[-1][1].append(n)
    return blocks


def signature(nodes: list[Node]) -> tuple:
    return tuple(n.op for n in nodes)


def annotation(g: Graph, n: Node) -> str:
    """rank / bits / N:M of a compressed layer, from the graph's compression records."""
    recs = g.meta.get("compression", {})
    origin = g.meta.get("param_origin", {})
    parts = g.meta.get("param_parts", {})
    for v in _weight_params(n):
        key = parts[v.name][0][0] if v.name in parts else v.name      # a stacked param: its first part's layer
        while key in origin and origin[key] != key:
            key = origin[key]
        rec = recs.get(key)
        if rec:
            parts = []
            if "rank" in rec:
                parts.append(f"rank {rec['rank']}")
            if "bits" in rec:
                parts.append(f"int{rec['bits']}" + (f" g{rec['group_size']}" if rec.get("group_size") else ""))
            if "nm" in rec:
                parts.append(rec["nm"])
            return " · ".join(parts)
    return ""


def _weight_params(n: Node):
    """Params feeding a node directly or through weight producers (dequantize, densify_nm)."""
    stack = [v for v in n.inputs if v is not None]
    while stack:
        v = stack.pop()
        if v.kind == "param":
            yield v
        elif v.node is not None and get_op(v.node.op).category == "compressed":
            stack.extend(u for u in v.node.inputs if u is not None)


def _layout(nodes: list[Node]):
    """Rank = longest path from the block's inputs; order within a rank by appearance."""
    inside = {id(n): n for n in nodes}
    rank = {}
    for n in nodes:
        preds = [rank[id(v.node)] for v in n.inputs if v is not None and v.node is not None and id(v.node) in inside]
        rank[id(n)] = 1 + max(preds, default=-1)
    cols: Counter = Counter()
    pos = {}
    for n in nodes:
        r = rank[id(n)]
        pos[id(n)] = (cols[r], r)
        cols[r] += 1
    return pos, max(cols.values(), default=1), max(rank.values(), default=0) + 1


def block_svg(g: Graph, nodes: list[Node], W=170, H=64) -> str:
    """Weight producers (dequantize, densify_nm) are drawn as the annotation of their layer."""
    nodes = [n for n in nodes if get_op(n.op).category != "compressed"]
    pos, ncols, nrows = _layout(nodes)
    width, height = ncols * W + 20, nrows * H + 20
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">']
    center = {k: (10 + c * W + (W - 16) / 2, 10 + r * H + 14) for k, (c, r) in pos.items()}
    for n in nodes:
        x2, y2 = center[id(n)]
        for v in n.inputs:
            if v is None or v.node is None or id(v.node) not in center:
                continue
            x1, y1 = center[id(v.node)]
            out.append(f'<path d="M{x1},{y1 + 14} C{x1},{y1 + 40} {x2},{y2 - 40} {x2},{y2 - 14}" stroke="#888" fill="none"/>')
            out.append(f'<text x="{(x1 + x2) / 2 + 4}" y="{(y1 + y2) / 2 + 3}" fill="#666" font-size="9">'
                       f'{html.escape(str(list(v.type.shape)))}</text>')
    for n in nodes:
        c, r = pos[id(n)]
        x, y = 10 + c * W, 10 + r * H
        color = COLORS.get(get_op(n.op).category, "#ccc")
        note = annotation(g, n)
        stroke = "#d62728" if note else "#555"
        out.append(f'<g><title>{html.escape(repr(n))}</title>'
                   f'<rect x="{x}" y="{y}" width="{W - 16}" height="28" rx="6" fill="{color}" stroke="{stroke}" '
                   f'stroke-width="{2 if note else 1}"/>'
                   f'<text x="{x + 6}" y="{y + 12}" font-weight="bold">{html.escape(n.op)}</text>'
                   f'<text x="{x + 6}" y="{y + 24}" font-size="9">{html.escape(note or n.name)}</text></g>')
    out.append("</svg>")
    return "".join(out)


def _block_summary(g: Graph, nodes: list[Node]) -> str:
    ops = Counter(n.op for n in nodes)
    params = {v.name: v for n in nodes for v in _weight_params(n)}
    nbytes = sum(v.type.nbytes() for v in params.values())
    notes = sorted({a for a in (annotation(g, n) for n in nodes) if a})
    return (f"{len(nodes)} ops ({', '.join(f'{k}×{v}' for k, v in ops.most_common(6))}) · "
            f"{nbytes / 1e6:.2f} MB" + (f" · compressed: {'; '.join(notes)}" if notes else ""))


def to_html(g: Graph, title: str | None = None, report: dict | None = None) -> str:
    """A self-contained page: summary, legend, then each group of identical blocks collapsible."""
    blocks = split_blocks(g)
    groups: list[list[tuple[str, list[Node]]]] = []
    for b in blocks:
        if groups and signature(groups[-1][0][1]) == signature(b[1]) and b[0] != "(top)":
            groups[-1].append(b)
        else:
            groups.append([b])
    legend = "".join(f'<span class="chip" style="background:{c}">{k}</span>' for k, c in COLORS.items())
    body = []
    for i, grp in enumerate(groups):
        name, nodes = grp[0]
        label = name if len(grp) == 1 else f"{grp[0][0]} … {grp[-1][0]} ({len(grp)} identical blocks)"
        inner = block_svg(g, nodes)
        more = "".join(f"<details><summary>{html.escape(n)} — {html.escape(_block_summary(g, ns))}</summary>"
                       f"{block_svg(g, ns)}</details>" for n, ns in grp[1:])
        body.append(f'<details {"open" if i < 2 else ""}><summary><b>{html.escape(label)}</b> — '
                    f'{html.escape(_block_summary(g, nodes))}</summary><div class="blk">{inner}{more}</div></details>')
    count = sum(p.value.type.numel() for p in g.params.values())       # parameters, as report()["totals"]
    total = (f"{len(g.nodes)} ops · {count:,} params in {len(g.params)} tensors · "
             f"{g.param_bytes() / 1e6:.2f} MB of weights")
    sig = ", ".join(f"%{v.name}: {v.type}" for v in g.inputs)
    comp = ""
    if report and report.get("compression", {}).get("compression_ratio"):
        c = report["compression"]
        comp = f" · compression ×{c['compression_ratio']} ({c['model_bytes_uncompressed'] / 1e6:.1f} → {c['model_bytes'] / 1e6:.1f} MB)"
    title = title or f"@{g.name}"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>
body{{font-family:sans-serif;margin:20px;color:#222}} summary{{cursor:pointer;padding:4px 0}}
details{{border-left:3px solid #ddd;padding-left:10px;margin:6px 0}} .blk{{overflow-x:auto}}
.chip{{display:inline-block;padding:2px 8px;margin:2px;border:1px solid #999;border-radius:8px;font-size:12px}}
code{{background:#f4f4f4;padding:1px 4px}}</style></head><body>
<h2>presso graph {html.escape(title)}</h2><p><code>({html.escape(sig)})</code><br>{html.escape(total + comp)}</p>
<p>{legend} <span class="chip" style="border:2px solid #d62728">compressed layer</span></p>
{''.join(body)}
<script type="application/json" id="graph-data">{html.escape(json.dumps({"ops": dict(g.op_histogram())}))}</script>
</body></html>"""


def to_svg(g: Graph) -> str:
    return block_svg(g, g.nodes)


def to_dot(g: Graph) -> str:
    lines = [f'digraph "{g.name}" {{', "  rankdir=TB; node [shape=box, style=\"rounded,filled\", fontname=Helvetica];"]
    for i, (name, nodes) in enumerate(split_blocks(g)):
        lines.append(f'  subgraph "cluster_{i}" {{ label="{name}";')
        for n in nodes:
            note = annotation(g, n)
            label = n.op + (f"\\n{note}" if note else "")
            lines.append(f'    "{n.name}" [label="{label}", fillcolor="{COLORS.get(get_op(n.op).category, "#ccc")}"];')
        lines.append("  }")
    for n in g.nodes:
        for v in n.inputs:
            if v is not None and v.node is not None:
                lines.append(f'  "{v.node.name}" -> "{n.name}" [label="{list(v.type.shape)}", fontsize=8];')
    lines.append("}")
    return "\n".join(lines) + "\n"
