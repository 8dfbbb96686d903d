"""Decode step of the Llama-1B config (Llama-3.2-1B shapes, random weights, fp16, batch 1) with
its LM head tied to the embedding, as Llama-3.2-1B has it, at three head precisions in one run:
the table (and so the head) left fp16, int8 and int4 (``quantize{embeddings=...}``); the other
linears int4 g128 in every case. Each step's logits are checked against the reference runtime
before it is timed (captured as a CUDA graph, median of repeated replays).

    python benchmarks/decode_head_gpu.py [--layers 16] [--max-len 1024] [--pos 512]
    TRITON_INTERPRET=1 python benchmarks/decode_head_gpu.py --smoke     # tiny config on the CPU
"""
import argparse
import time

import torch

import presso
from presso.models import LlamaConfig, make_llama
from presso.runtime.reference import ReferenceRuntime
from decode_gpu import timed

HEADS = {"fp16": "", "int8": ",embeddings=int8", "int4": ",embeddings=int4"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--pos", type=int, default=512)
    ap.add_argument("--weights", default=None, help="the recipe's start, without '}' (default int4 g128; smoke g32)")
    ap.add_argument("--smoke", action="store_true", help="tiny config on the CPU (TRITON_INTERPRET=1)")
    a = ap.parse_args()
    dev = "cpu" if a.smoke else "cuda"
    a.weights = a.weights or f"quantize{{weights=int4,group_size={32 if a.smoke else 128}"
    base = LlamaConfig(vocab=256, dim=64, layers=2, heads=4, kv_heads=2, hidden=160) if a.smoke \
        else LlamaConfig.llama_1b()
    cfg = LlamaConfig(**{**base.__dict__, "layers": a.layers if not a.smoke else 2, "max_seq": 2 * a.max_len})
    model, _ = make_llama(batch=2, seq=8, config=cfg)
    model.lm_head.weight = model.embed_tokens.weight          # tied, as in Llama-3.2-1B
    model = model.float() if a.smoke else model.half()
    ex = (torch.randint(0, cfg.vocab, (2, 8)),)
    ids = torch.randint(0, cfg.vocab, (1, 1), device=dev)
    pos = torch.tensor([min(a.pos, a.max_len - 1)], device=dev)
    graph = presso.compile(model, example_inputs=ex, generation=True, max_len=a.max_len).graph
    rows = []
    for head, extra in HEADS.items():
        recipe = a.weights + extra + "}"
        t0 = time.time()
        cm = presso.compile(graph, example_inputs=ex, recipe=recipe, generation=True, max_len=a.max_len,
                            target="cuda")
        gen = cm.decode_program()
        rt = gen.step_rt
        roles = cm.report()["compression"]["bytes_by_role"]
        caches = gen.new_caches({"batch": 1})
        torch.manual_seed(1)
        for c in caches:
            c.normal_()
        # the step's inputs before its caches: ids, position (and each row's start, for ragged batches)
        head_in = [ids, pos] + [torch.zeros(1, dtype=torch.long, device=dev)] * (len(gen.step.inputs) - 2 - len(caches))
        with torch.no_grad():
            got = rt.run(*head_in, *[c.clone() for c in caches])[0].float()
            want = ReferenceRuntime(gen.step, device=dev).run(*head_in, *[c.clone() for c in caches])[0].float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err < 2e-2, (head, err)
            head_kernel = rt.program.kernels[gen.step.outputs[0].node.name]
            if dev == "cuda":
                rt.capture(*head_in, *caches)
                static = rt._graph_exec.static_in          # the graph's own caches: no copy per replay
                ms = timed(lambda: rt.run(*head_in, *static[len(head_in):]), iters=200)
            else:
                ms = timed(lambda: rt.run(*head_in, *caches), iters=2)
        rows.append((head, recipe, head_kernel, roles["tied_embedding_head"], cm.graph.param_bytes(), err, ms))
        print(f"compiled {recipe} in {time.time() - t0:.0f}s", flush=True)
        del cm, gen, rt, caches
        if dev == "cuda":
            torch.cuda.empty_cache()
    print(f"\ndecode step, Llama-1B config with tied head, {cfg.layers} layers, batch 1, position {int(pos)} of "
          f"{a.max_len}, {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu (smoke)'}")
    print("| head | recipe | head kernel | table bytes | model bytes | rel err vs reference | ms / step "
          "| vs fp16 head |")
    print("|---|---|---|---|---|---|---|---|")
    t16 = rows[0][-1]
    for head, recipe, kernel, tb, mb, err, ms in rows:
        print(f"| {head} | `{recipe}` | {kernel} | {tb:,} | {mb:,} | {err:.1e} | {ms:.3f} | {t16 / ms:.2f}x |")


if __name__ == "__main__":
    main()
