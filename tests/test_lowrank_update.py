"""lowrank's SVD-LLM machinery on tiny models (seconds): the closed-form fit to the uncompressed
outputs, sequential factoring, the rank allocation under the parameter budget, and the typed
errors of its options. Errors are measured against the reference runtime of the uncompressed graph."""
import functools

import pytest
import torch

import presso
from presso import PipelineError
from presso.models.llama import LlamaConfig, make_llama
from presso.passes.calibrate import LinearStats
from presso.passes.fisher import output_fisher, sample_labels
from presso.passes.lowrank import factorize, factorize_fitted, fisher_spectrum, fitted_error, refit_up
from presso.passes.sequential import cross_gram, input_stats

CONFIG = LlamaConfig(vocab=128, dim=64, layers=2, heads=4, kv_heads=2, hidden=160)


@functools.lru_cache(maxsize=None)
def setup():
    model, example = make_llama(batch=2, seq=16, config=CONFIG)
    torch.manual_seed(1)
    calib = [(torch.randint(0, CONFIG.vocab, (2, 16)),) for _ in range(8)]
    base = presso.compile(model, example_inputs=example)
    return base, example, calib


@functools.lru_cache(maxsize=None)
def compiled(recipe: str):
    base, example, calib = setup()
    return presso.compile(base.graph, example_inputs=example, recipe=recipe, calibration=calib, verbose=False)


def output_error(recipe: str) -> float:
    """Relative squared error of the logits on the calibration samples vs. the uncompressed graph."""
    base, _, calib = setup()
    cm = compiled(recipe)
    num = den = 0.0
    for s in calib:
        ref = base(*s).double()
        num, den = num + float(((cm(*s).double() - ref) ** 2).sum()), den + float((ref ** 2).sum())
    return num / den


def _stats(x: torch.Tensor, x_ref: torch.Tensor) -> LinearStats:
    st = input_stats([x])
    st.reference, st.cross = input_stats([x_ref]), cross_gram([x_ref], [x])
    return st


def test_fitted_factors_beat_plain_whitening_on_the_uncompressed_outputs():
    torch.manual_seed(0)
    n, d_in, d_out, r = 512, 48, 40, 12
    x_ref = torch.randn(n, d_in) @ torch.randn(d_in, d_in)
    # the input as compressed earlier layers give it: mixed channels plus noise
    x = x_ref @ (torch.eye(d_in) + 0.3 * torch.randn(d_in, d_in) / d_in ** 0.5) + 0.1 * torch.randn(n, d_in)
    w = torch.randn(d_out, d_in)
    st = _stats(x, x_ref)

    def direct(w2):  # ||X W^T - X~ W2^T||^2 / ||X W^T||^2 computed on the rows
        y = x_ref.double() @ w.double().T
        return float(((y - x.double() @ w2.double().T) ** 2).sum() / (y ** 2).sum())

    fit = factorize_fitted(w, st, damp=0.0)
    plain = factorize(w, st.gram, whitened=True)
    w_fit, w_plain = fit.B[:, :r] @ fit.A[:r], plain.B[:, :r] @ plain.A[:r]
    assert fitted_error(w, w_fit, st) == pytest.approx(direct(w_fit), rel=1e-6)
    assert fitted_error(w, w_plain, st) == pytest.approx(direct(w_plain), rel=1e-6)
    assert float(fit.err[r]) == pytest.approx(direct(w_fit), rel=1e-6)
    assert direct(w_fit) < 0.9 * direct(w_plain)
    # B is the least-squares B for A: no other B does better
    a = fit.A[:r]
    h, h_ref = x.double() @ a.T, x_ref.double() @ w.double().T
    b_ls = torch.linalg.lstsq(h, h_ref).solution.T
    assert torch.allclose(b_ls, fit.B[:, :r], atol=1e-6 * float(b_ls.abs().max()))


def test_fitted_factors_at_full_rank_on_unchanged_inputs_are_the_weight():
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    w = torch.randn(24, 32)
    f = factorize_fitted(w, _stats(x, x), damp=0.01)
    assert torch.allclose(f.B @ f.A, w.double(), atol=1e-8)


def test_update_lowers_the_output_error_on_the_calibration_samples():
    base = "lowrank{method=whitened,ratio=0.8"
    oneshot, plain, fitted = (output_error(base + extra) for extra in (",sequential=false}", ",update=false}",
                                                                        ",update=true}"))
    assert fitted < plain and fitted < oneshot
    ranks = lambda recipe: {k: v.get("rank") for k, v in compiled(recipe).graph.meta["compression"].items()}  # noqa: E731
    assert ranks(base + ",update=true}") == ranks(base + ",update=false}")      # the same allocation: only the fit differs


def test_refit_up_is_the_least_squares_up_projection_for_the_whitened_down_projection():
    torch.manual_seed(0)
    n, d_in, d_out, r = 512, 48, 40, 12
    x_ref = torch.randn(n, d_in) @ torch.randn(d_in, d_in)
    x = x_ref + 0.3 * torch.randn(n, d_in)
    w = torch.randn(d_out, d_in)
    st = _stats(x, x_ref)
    f = refit_up(w, st, r, damp=0.0)
    assert torch.allclose(f.A, factorize(w, st.gram, True).A[:r])      # the whitened truncation's A
    h, target = x.double() @ f.A.T, x_ref.double() @ w.double().T
    b_ls = torch.linalg.lstsq(h, target).solution.T
    assert torch.allclose(f.B, b_ls, atol=1e-6 * float(b_ls.abs().max()))
    same = _stats(x_ref, x_ref)                       # inputs unchanged: the truncation's own B
    plain = factorize(w, same.gram, True)
    assert torch.allclose(refit_up(w, same, r, damp=0.0).B, plain.B[:, :r], atol=1e-6 * float(plain.B.abs().max()))


def test_fisher_of_the_logits_is_the_softmax_score_of_the_sampled_labels():
    base, example, calib = setup()
    g = base.graph
    head = [n for n in g.nodes if n.op == "linear"][-1]
    fisher = output_fisher(g, calib[:2], [head], seed=3)[head.name]
    gen = torch.Generator().manual_seed(3)
    want = torch.zeros(CONFIG.vocab, dtype=torch.float64)
    for s in calib[:2]:
        logits = base(*s).reshape(-1, CONFIG.vocab).float()
        p = torch.softmax(logits, -1)
        labels = sample_labels(p, gen)
        want += ((torch.nn.functional.one_hot(labels, CONFIG.vocab) - p).double() ** 2).sum(0)
    assert torch.allclose(fisher, want, rtol=1e-4, atol=1e-6)


def test_sampled_labels_follow_the_distribution():
    p = torch.tensor([[0.1, 0.6, 0.3]]).repeat(20000, 1)
    labels = sample_labels(p, torch.Generator().manual_seed(0))
    freq = torch.bincount(labels, minlength=3).double() / len(labels)
    assert torch.allclose(freq, p[0].double(), atol=0.01)


def test_fisher_spectrum_is_the_weighted_error_of_the_whitened_truncation():
    torch.manual_seed(0)
    x = torch.randn(400, 24) @ torch.randn(24, 24)
    for d_out in (16, 40):                      # wide and tall weights take different routes
        w, fish = torch.randn(d_out, 24), torch.rand(d_out)
        st = input_stats([x])
        curve = fisher_spectrum(w, st.gram, fish)
        f = factorize(w, st.gram, True)
        for r in (0, 5, 12):
            e = (w.double() - f.B[:, :r] @ f.A[:r]) @ x.double().T
            assert float(curve[r]) == pytest.approx(float((fish.double()[:, None] * e ** 2).sum()), rel=1e-5)


@pytest.mark.parametrize("allocation", ["greedy", "fisher", "by-type", "uniform"])
@pytest.mark.parametrize("ratio", [0.8, 0.5])
def test_allocation_meets_the_parameter_budget_with_kernel_friendly_ranks(allocation, ratio):
    recipe = f"lowrank{{method=whitened,ratio={ratio},allocation={allocation}}}"
    g0, g = setup()[0].graph, compiled(recipe).graph
    dense = {n.inputs[1].name: n.inputs[1].type.shape for n in g0.nodes if n.op == "linear"}
    total = sum(o * i for o, i in dense.values())
    comp = g.meta["compression"]
    kept = 0
    for name, (o, i) in dense.items():
        r = comp.get(name, {}).get("rank")
        if r is None:
            kept += o * i
        else:
            assert r % 8 == 0 and r * (o + i) < o * i, (name, r)
            kept += r * (o + i)
    assert kept <= ratio * total
    # the budget is spent, not wasted (uniform and by-type allocate in coarse steps on tiny layers)
    assert kept > (ratio - (0.05 if allocation in ("greedy", "fisher") else 0.15)) * total
    linear_params = sum(g.params[n.inputs[1].name].data.numel() for n in g.nodes if n.op == "linear")
    assert linear_params == kept
    assert output_error(recipe) < 1.0


def test_greedy_allocation_gives_layers_different_ranks():
    g = compiled("lowrank{method=whitened,ratio=0.5}").graph
    assert len({v["rank"] for v in g.meta["compression"].values()}) > 1


@pytest.mark.parametrize("recipe, msg", [
    ("lowrank{allocation=even}", r"option 'allocation' must be one of \['greedy', 'fisher', 'by-type', 'uniform'\], got 'even'"),
    ("lowrank{method=whitened,damp=-1}", r"option 'damp' must be >= 0, got -1"),
    ("lowrank{method=whitened,update=maybe}", r"option 'update'"),
    ("lowrank{method=whitened,sequential=2}", r"option 'sequential'"),
    ("lowrank{method=whitened,fisher_weighted=true}", r"option fisher_weighted=true needs allocation=fisher"),
    ("lowrank{method=svd,allocation=fisher}", r"option allocation='fisher' needs method=whitened and sequential=true"),
    ("lowrank{method=whitened,update=true,refit=all}", r"option 'refit' must be one of \['full', 'up'\]"),
])
def test_bad_options_are_typed_errors(recipe, msg):
    base, example, calib = setup()
    with pytest.raises(PipelineError, match=msg):
        presso.compile(base.graph, example_inputs=example, recipe=recipe, calibration=calib[:1])


def test_sequential_whitening_needs_calibration():
    from presso.passes.calibrate import CalibrationError
    base, example, _ = setup()
    with pytest.raises(CalibrationError, match="needs calibration data"):
        presso.compile(base.graph, example_inputs=example, recipe="lowrank{method=whitened}")


def test_full_rank_sequential_factors_are_exact():
    assert output_error("lowrank{method=whitened,ranks=.*:full}") < 1e-8
