"""Sequential (layer-wise) calibration: the node-major walk sees every linear's input exactly as
the reference runtime computes it, and keeps seeing it right after a rewrite changes how an
already computed value is produced."""
import pytest
import torch

import presso
from presso.models import make_llama
from presso.passes.calibrate import collect_linear_stats
from presso.passes.compress_common import dense_linears, replace_linear
from presso.passes.sequential import calibrate_sequentially


def setup():
    model, inputs = make_llama(batch=2, seq=12)
    g = presso.compile(model, example_inputs=inputs).graph
    torch.manual_seed(1)
    samples = [(torch.randint(0, 256, (2, 12)),) for _ in range(3)]
    return model, inputs, g, samples


def test_the_walk_sees_what_the_reference_runtime_computes():
    _, _, g, samples = setup()
    want = collect_linear_stats(g, samples)
    seen = {}

    def observe(x, nodes, stats):
        assert all(n.inputs[0] is x for n in nodes)
        seen.update({n.name: stats for n in nodes})
    calibrate_sequentially(g, samples, [n for n in g.nodes if n.op == "linear"], observe)
    assert set(seen) == set(want) and len(seen) == 15       # 7 linears per layer, 2 layers, the head
    for name, st in want.items():
        assert seen[name].rows == st.rows
        assert torch.allclose(seen[name].gram, st.gram, rtol=1e-5, atol=1e-6 * float(st.gram.abs().max()))


@pytest.mark.parametrize("fix_up", [True, False])
def test_a_scale_folded_into_the_norm_is_applied_to_the_values_already_computed(fix_up):
    """An exact rewrite (norm weight / s, linear weight * s) leaves every later layer's input as
    it was, provided the walk's copies of the norm's output are rescaled too."""
    model, inputs, g, samples = setup()
    want = collect_linear_stats(g, samples)
    linears = {l.node: l for l in dense_linears(g)}
    seen = {}

    def fold(x, nodes, stats):
        seen.update({n.name: stats for n in nodes})
        norm = x.node
        if norm is None or norm.op != "rms_norm":
            return None
        s = torch.linspace(0.5, 2.0, x.type.shape[-1], dtype=torch.float64)
        w = norm.inputs[1]
        g.replace_uses(w, g.add_param(g.fresh_name(w.name + ".s"), (g.params[w.name].data.double() / s).float()))
        for n in nodes:
            l = linears[n]
            wp = g.add_param(g.fresh_name(l.weight.name + ".s"), (l.tensor.double() * s).float())
            replace_linear(g, n, g.op("linear", x, wp, n.inputs[2], before=n))
        return {x: lambda t: (t.double() / s).to(t.dtype)} if fix_up else None
    calibrate_sequentially(g, samples, list(linears), fold)
    last = "linear_6"            # layer 0's down projection: after both rescaled norms of layer 0
    later = [n for n in want if n not in ("linear", "linear_1", "linear_2")]
    assert last in later
    close = [torch.allclose(seen[n].gram, want[n].gram, rtol=1e-4, atol=1e-5 * float(want[n].gram.abs().max()))
             for n in later]
    assert all(close) if fix_up else not all(close)
    model_out = model(*inputs).detach()
    got = presso.compile(g, example_inputs=inputs)(*inputs)
    assert torch.allclose(got, model_out, rtol=1e-4, atol=1e-4)     # the rewrite itself is exact
