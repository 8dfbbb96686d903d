"""CompiledModel.report(): a dict for programs, a table when printed."""
import json

import presso
from presso.models import make_mlp


def test_report_is_a_dict_that_prints_as_a_table():
    m, ins = make_mlp()
    cm = presso.compile(m, example_inputs=ins, calibration=[ins],
                        recipe="lowrank{ratio=0.5,rank_multiple=16},quantize{weights=int4,group_size=16,method=gptq},"
                               "sparsify{pattern=2:4}")
    rep = cm.report()
    assert isinstance(rep, dict) and json.loads(json.dumps(rep))["totals"] == rep["totals"]
    text = str(rep)
    lines = text.splitlines()
    assert lines[0].startswith(f"graph @MLP: {rep['totals']['nodes']} ops, {rep['totals']['params']:,} params, "
                               f"{rep['totals']['bytes']:,} bytes")
    header = next(i for i, l in enumerate(lines) if l.startswith("layer "))
    assert lines[header].split() == ["layer", "method", "stored", "as", "bytes", "before", "bytes", "after", "ratio",
                                     "rel", "err"]
    rows = {l.split()[0]: l for l in lines[header + 2:header + 2 + len(rep["compression"]["layers"])]}
    for layer in rep["compression"]["layers"]:
        row = rows[layer["layer"]]
        method = ("lowrank(svd) + " if "rank" in layer else "") + f"quantize({layer['method']}) + sparsify(magnitude)"
        form = (f"rank={layer['rank']} " if "rank" in layer else "") + f"int4 g{layer['group_size']} 2:4"
        assert row.split("  ")[0] == layer["layer"] and method in row and form in row
        assert f"{layer['bytes_before']:,}" in row and f"{layer['bytes_after']:,}" in row
        assert f"{layer['rel_error']:.4f}" in row
    assert any(l.startswith("model: ") for l in lines) and lines[-1].startswith("passes: canonicalize")
    assert repr(rep) == repr(dict(rep))


def test_progress_bars_by_default_and_silenced_by_verbose_false(monkeypatch, capsys):
    from presso.passes import progress
    monkeypatch.setattr(progress, "DELAY_S", 0.0)      # show at once (by default only loops over 2 s show)
    m, ins = make_mlp()
    recipe = "quantize{weights=int4,group_size=16,method=gptq}"
    presso.compile(m, example_inputs=ins, calibration=[ins, ins], recipe=recipe)
    err = capsys.readouterr().err
    assert "passes:" in err and "quantize" in err         # the pipeline's bar and the pass's own
    presso.compile(m, example_inputs=ins, calibration=[ins, ins], recipe=recipe, verbose=False)
    assert capsys.readouterr().err == ""
