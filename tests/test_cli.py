"""The presso command: exit codes and output. The commands run in this process through
``presso.cli.main`` (what the ``presso`` script calls), each captured as a subprocess's would be;
``python -m presso`` itself, in a fresh interpreter, is tested by the last tests here."""
import contextlib
import io
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass

import pytest
from safetensors.torch import save_file

import torch

from presso import load as load_artifact
from presso.cli import main


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


def presso(*args, cwd=None) -> Ran:
    """``presso ARGS`` in this process: its exit code and what it printed to stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            contextlib.chdir(cwd or "."):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:         # argparse's --help and usage errors
            code = e.code
    return Ran(code, out.getvalue(), err.getvalue())


def presso_process(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m presso ARGS`` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "presso", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    calib = d / "calib.safetensors"
    save_file({f"{i}.0": torch.randint(0, 256, (2, 16)) for i in range(3)}, str(calib))
    out = d / "gpt2.presso"
    r = presso("compile", "presso.models:make_gpt2", "--recipe", "quantize{weights=int4,group_size=32,method=gptq}",
               "--calibration", calib, "-o", out, "-q")
    assert r.returncode == 0, r.stderr
    assert "gptq" in r.stdout and "int4 g32" in r.stdout and "h.0.c_attn.weight" in r.stdout and f"saved {out}" in r.stdout
    return out


def test_inspect_factory_table_ir_and_json():
    r = presso("inspect", "presso.models:make_llama")
    assert r.returncode == 0 and "graph @Llama" in r.stdout and "attention×2" in r.stdout
    r = presso("inspect", "presso.models:make_llama", "--ir")
    assert r.returncode == 0 and "= rotary(" in r.stdout and r.stdout.startswith("graph @Llama(")
    r = presso("inspect", "presso.models:make_mlp", "--json")
    rep = json.loads(r.stdout)
    assert rep["ops"] == {"gelu": 1, "linear": 3, "relu": 1} and rep["totals"]["params"] > 0


def test_inspect_artifact_and_onnx(artifact, tmp_path):
    r = presso("inspect", artifact)
    assert r.returncode == 0 and "int4" in r.stdout and "model:" in r.stdout
    from presso.models import make_mlp
    from zoo_util import export_onnx
    import onnx
    m, ins = make_mlp()
    onnx.save(export_onnx(m, ins), str(tmp_path / "mlp.onnx"))
    r = presso("inspect", tmp_path / "mlp.onnx")
    assert r.returncode == 0 and "linear×3" in r.stdout


def test_show_writes_html_svg_dot(artifact, tmp_path):
    for ext in ("html", "svg", "dot"):
        out = tmp_path / f"g.{ext}"
        r = presso("show", artifact, "-o", out)
        assert r.returncode == 0, r.stderr
        text = out.read_text()
        assert "dequantize" not in text or ext != "html" or "int4 g32" in text
    html = (tmp_path / "g.html").read_text()
    assert "<script src" not in html and "http" not in html.replace("http://www.w3.org/2000/svg", "")  # self-contained
    assert "identical blocks" in html and "int4 g32" in html
    g = load_artifact(artifact).graph              # "params" counts parameters, not tensors
    assert f"{sum(p.value.type.numel() for p in g.params.values()):,} params in {len(g.params)} tensors" in html
    assert (tmp_path / "g.dot").read_text().startswith('digraph "GPT2"')


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_html_renders_in_headless_chromium(artifact, tmp_path):
    html = tmp_path / "g.html"
    assert presso("show", artifact, "-o", html).returncode == 0
    png = tmp_path / "g.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,800", f"--screenshot={png}",
                    html.as_uri()], capture_output=True, timeout=120)
    assert png.exists() and png.stat().st_size > 10_000


def test_diff_and_bench(artifact):
    r = presso("diff", "presso.models:make_gpt2", artifact)
    assert r.returncode == 0 and "dequantize +" in r.stdout and "h.1.c_fc.weight" in r.stdout
    r = presso("bench", artifact, "--iters", "3", "--warmup", "1")
    assert r.returncode == 0 and "median" in r.stdout and "samples/s" in r.stdout


@pytest.mark.parametrize("args, msg", [
    (["inspect", "missing.onnx"], "no such file"),
    (["inspect", "nothing"], "is not a .onnx file"),
    (["compile", "presso.models:make_mlp", "--target", "tpu"], "unknown target 'tpu'"),
    (["compile", "presso.models:make_mlp", "--recipe", "quantize{weights=int4"], "malformed pipeline"),
    (["compile", "presso.models:make_mlp", "--recipe", "lowrank{ratio=2}"], "must be in (0, 1]"),
    (["inspect", "presso.models:nope"], "cannot import factory"),
    (["show", "presso.models:make_mlp", "-o", "g.png"], "must end in .html, .svg or .dot"),
])
def test_bad_arguments_print_one_line_and_exit_nonzero(args, msg, tmp_path):
    r = presso(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert msg in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_unreadable_artifact_and_debug_traceback(tmp_path):
    bad = tmp_path / "bad.presso"
    bad.mkdir()
    (bad / "manifest.json").write_text("{}")
    r = presso("inspect", bad)
    assert r.returncode == 2 and "does not describe a presso artifact" in r.stderr and "Traceback" not in r.stderr
    r = presso_process("--debug", "inspect", bad)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_python_m_presso_runs_the_command():
    r = presso_process("inspect", "presso.models:make_mlp", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ops"] == {"gelu": 1, "linear": 3, "relu": 1}


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A small random Llama saved as Hugging Face saves it, with a word-level tokenizer."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    d = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(d)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 128)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>").save_pretrained(d)
    return d


def hf_text(folder, prompts, n, **kw):
    """What transformers' own generate gives, decoded."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    out = []
    for p in prompts:
        with torch.no_grad():
            ids = model.generate(torch.tensor([tok(p)["input_ids"]]), max_new_tokens=n, pad_token_id=0, **kw)
        out.append(tok.decode(ids[0], skip_special_tokens=True))
    return out


def test_generate_prints_the_text_of_transformers_generate(hf_folder):
    prompt = "w5 w9 w100 w7"
    r = presso("generate", hf_folder, "--prompt", prompt, "--max-new-tokens", 10, "--repetition-penalty", 1.2)
    assert r.returncode == 0, r.stderr
    want = hf_text(hf_folder, [prompt], 10, do_sample=False, repetition_penalty=1.2)[0]
    assert r.stdout == want + "\n" and len(want.split()) > 4 + 3
    assert "tokens/s, target reference" in r.stderr
    # several prompts: a ragged batch, each prompt's text as transformers gives it alone
    prompts = ["w5 w9 w100 w7", "w3", "w60 w61 w62 w63 w64 w65 w66"]
    r = presso("generate", hf_folder, *[x for p in prompts for x in ("--prompt", p)], "--max-new-tokens", 6)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"[{i}] {t}" for i, t in enumerate(hf_text(hf_folder, prompts, 6,
                                                                                  do_sample=False))]


def test_generate_streams_each_token_as_it_comes(hf_folder, monkeypatch):
    from presso.cli import main

    class Recorder:
        def __init__(self):
            self.writes = []

        def write(self, s):
            self.writes.append(s)

        def flush(self):
            pass
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["generate", str(hf_folder), "--prompt-ids", "5,9,100", "--max-new-tokens", "8",
                 "--eos-token-id", "127"]) == 0
    # the prompt, one write per new token (each the text that token added), the final newline
    assert len(out.writes) == 1 + 8 + 1 and out.writes[0] == "w5 w9 w100" and out.writes[-1] == "\n"
    assert all(w.startswith(" w") for w in out.writes[1:-1]), out.writes


def test_generate_errors_are_one_line(hf_folder):
    bad = [(["presso.models:make_llama", "--prompt", "hello"], "has no tokenizer to read --prompt text"),
           (["presso.models:make_llama", "--prompt-ids", "1,x"], "--prompt-ids takes token ids"),
           (["presso.models:make_llama"], "give a prompt: --prompt TEXT"),
           ([hf_folder, "--prompt", "w5", "--top-p", "2"], "top_p must be a number in (0, 1]"),
           ([hf_folder, "--prompt", "w5", "--tokenizer", hf_folder / "none"], "no tokenizer in")]
    for args, message in bad:
        r = presso("generate", *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr
