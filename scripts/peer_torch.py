#!/usr/bin/env python3
"""PyTorch peers for moed's MoE layer benchmark (never a dependency of moed).

For each shape (H, I, E, k) and token count T, times one bf16 MoE layer
(router + top-k + SwiGLU experts + weighted combine) on one GPU:

  grouped_mm          a plain torch._grouped_mm MoE: router matmul, softmax
                      top-k (renormalized), tokens sorted by expert, int32
                      cumulative offsets, one grouped GEMM for gate/up, SwiGLU,
                      one for down, weighted index_add back to the tokens
  hf_mixtral[IMPL]    transformers' MixtralSparseMoeBlock
  hf_qwen3_moe[IMPL]  transformers' Qwen3MoeSparseMoeBlock (norm_topk_prob)
                      with IMPL each experts backend transformers offers
                      (eager, grouped_mm, batched_mm; those that exist run)

Timing: CUDA events around every iteration after warm-up, median of --iters
(>= 20 by default). Inputs and weights are random bf16 (never zeros). A cell
that cannot run (out of memory, missing feature) is reported as n/a with the
reason; nothing in one cell stops the others.

  python3 peer_torch.py --shape qwen3 --shape mixtral --tokens 1,16,128 --json peer.json
  python3 peer_torch.py --shape 2048,768,128,8 --variants grouped_mm
  python3 peer_torch.py --self-check

The roofline column is max(bytes of the experts actually used / HBM bandwidth,
flops / 790e12), HBM 4.3e12 B/s on an H200 and 3.0e12 elsewhere (GPU-NOTES.md);
"used" experts are the expected distinct experts of T uniform top-k picks.
"""
import argparse
import json
import math
import statistics
import sys
import time
import traceback

SHAPES = {"qwen3": (2048, 768, 128, 8), "mixtral": (4096, 14336, 8, 2)}
HF_BLOCKS = ("hf_mixtral", "hf_qwen3_moe")
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")
PEAK_FLOPS = 790e12

try:
    import torch
    import torch.nn.functional as F
except Exception as e:  # noqa: BLE001 - reported, not raised
    torch = None
    TORCH_ERROR = f"{type(e).__name__}: {e}"
else:
    TORCH_ERROR = None


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def short(e):
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:200]


def parse_shape(text):
    if text in SHAPES:
        return text, SHAPES[text]
    try:
        h, i, e, k = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape '{text}': use {', '.join(SHAPES)} or H,I,E,k")
    if min(h, i, e, k) < 1 or k > e:
        raise argparse.ArgumentTypeError(f"shape '{text}': need positive sizes and k <= E")
    return f"H{h}_I{i}_E{e}_k{k}", (h, i, e, k)


def hbm_bandwidth(device_name):
    return 4.3e12 if "H200" in device_name else 3.0e12


def roofline_ms(shape, tokens, bandwidth):
    h, i, e, k = shape
    used = e * (1.0 - (1.0 - k / e) ** tokens)
    weight_bytes = used * 3 * h * i * 2
    flops = 2.0 * tokens * k * 3 * h * i
    return max(weight_bytes / bandwidth, flops / PEAK_FLOPS) * 1e3


# ---------------------------------------------------------------- the plain grouped_mm MoE

def grouped_mm_fn():
    """torch._grouped_mm (torch >= 2.8), else F.grouped_mm; None when neither."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        fn = getattr(F, "grouped_mm", None)
    return fn


def make_weights(shape, device, seed):
    """Router (E,H), W13 (E,2I,H) = [gate; up] rows, W2 (E,H,I): bf16, scaled
    so that activations stay O(1) through the layer."""
    h, i, e, _ = shape
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    bf = torch.bfloat16
    wr = torch.randn(e, h, device=device, dtype=bf, generator=g).mul_(h ** -0.5)
    w13 = torch.randn(e, 2 * i, h, device=device, dtype=bf, generator=g).mul_(h ** -0.5)
    w2 = torch.randn(e, h, i, device=device, dtype=bf, generator=g).mul_(i ** -0.5)
    return wr, w13, w2


def make_input(tokens, h, device, seed):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    x = torch.randn(tokens, h, device=device, dtype=torch.bfloat16, generator=g)
    return x


def route(x, wr, k):
    """Softmax over the router logits, top-k, renormalized (Mixtral, and
    Qwen3-MoE with norm_topk_prob): float32 weights (T,k), int64 ids (T,k)."""
    logits = x @ wr.t()
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_moe(x, wr, w13, w2, k, gmm, routing=None):
    """One MoE layer with two grouped GEMMs; x (T,H) bf16 -> (T,H) bf16."""
    tokens, h = x.shape
    e, two_i, _ = w13.shape
    weights, ids = routing if routing is not None else route(x, wr, k)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token_of_row = order // k
    # histc, not bincount: bincount syncs with the host on CUDA
    counts = torch.histc(flat.float(), bins=e, min=0, max=e - 1)
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    xs = x.index_select(0, token_of_row)
    gate_up = gmm(xs, w13.transpose(-2, -1), offs=offs)  # (S, 2I)
    gate, up = gate_up.split(two_i // 2, dim=-1)
    act = F.silu(gate) * up  # (S, I), contiguous
    y = gmm(act, w2.transpose(-2, -1), offs=offs)  # (S, H)
    y = y.float() * weights.reshape(-1).index_select(0, order).unsqueeze(1)
    out = torch.zeros(tokens, h, device=x.device, dtype=torch.float32)
    out.index_add_(0, token_of_row, y)
    return out.to(torch.bfloat16)


def naive_moe(x, wr, w13, w2, k, routing=None):
    """Per-expert loop in float32: the reference of --self-check."""
    x, wr, w13, w2 = (t.float() for t in (x, wr, w13, w2))
    weights, ids = routing if routing is not None else route(x, wr, k)
    out = torch.zeros_like(x)
    i = w13.shape[1] // 2
    for expert in range(w13.shape[0]):
        tok, slot = (ids == expert).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w13[expert].t()
        act = F.silu(h[:, :i]) * h[:, i:]
        out.index_add_(0, tok, (act @ w2[expert].t()) * weights[tok, slot].unsqueeze(1))
    return out


# ---------------------------------------------------------------- transformers' blocks

def hf_versions():
    try:
        import transformers
        return transformers.__version__
    except Exception as e:  # noqa: BLE001
        return f"n/a ({short(e)})"


def hf_build(kind, shape, device):
    """Builds transformers' block of that kind for shape, in bf16 on device."""
    h, i, e, k = shape
    common = dict(hidden_size=h, num_hidden_layers=1, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=256, hidden_act="silu")
    if kind == "hf_mixtral":
        from transformers.models.mixtral import modeling_mixtral as mod
        from transformers import MixtralConfig
        cfg = MixtralConfig(intermediate_size=i, num_local_experts=e, num_experts_per_tok=k,
                            router_jitter_noise=0.0, **common)
        cls = mod.MixtralSparseMoeBlock
    else:
        from transformers.models.qwen3_moe import modeling_qwen3_moe as mod
        from transformers import Qwen3MoeConfig
        cfg = Qwen3MoeConfig(moe_intermediate_size=i, intermediate_size=i, num_experts=e,
                             num_experts_per_tok=k, norm_topk_prob=True, decoder_sparse_step=1,
                             mlp_only_layers=[], **common)
        cls = mod.Qwen3MoeSparseMoeBlock
    set_impl(cfg, "eager", strict=False)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            block = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    block = block.to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)
    return block, cfg


def set_impl(cfg, impl, strict=True, block=None):
    """Selects transformers' experts backend (config._experts_implementation,
    read by the experts module on every forward) on cfg and on every config a
    submodule of block holds; True when it took."""
    configs = {id(cfg): cfg}
    if block is not None:
        for m in block.modules():
            c = getattr(m, "config", None)
            if c is not None and hasattr(c, "to_dict"):
                configs[id(c)] = c
    took = True
    for c in configs.values():
        ok = False
        for attr in ("_experts_implementation", "experts_implementation"):
            try:
                setattr(c, attr, impl)
            except Exception:  # noqa: BLE001
                continue
            if getattr(c, "_experts_implementation", None) == impl:
                ok = True
                break
        took = took and ok
    if not took and strict:
        raise RuntimeError(f"this transformers has no experts_implementation switch ({impl})")
    return took


def hf_experts_backends():
    """The experts backends this transformers registers (besides eager), or None."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        return sorted(ALL_EXPERTS_FUNCTIONS.keys())
    except Exception:  # noqa: BLE001
        return None


def hf_load(block, wr, w13, w2):
    """Copies our router and expert weights into the block (fused 3D layout of
    transformers 5, or the older per-expert ModuleList)."""
    e, two_i, h = w13.shape
    i = two_i // 2
    gate = getattr(block, "gate", None)
    gate_w = getattr(gate, "weight", None)
    if gate_w is None or tuple(gate_w.shape) != (e, h):
        raise RuntimeError(f"unexpected router layout {None if gate_w is None else tuple(gate_w.shape)}")
    gate_w.copy_(wr)
    ex = block.experts
    gu, down = getattr(ex, "gate_up_proj", None), getattr(ex, "down_proj", None)
    if isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor):
        transposed = getattr(ex, "experts_are_transposed", False)
        if transposed:
            gu.copy_(w13.transpose(1, 2))
            down.copy_(w2.transpose(1, 2))
        elif tuple(gu.shape) == (e, two_i, h) and tuple(down.shape) == (e, h, i):
            gu.copy_(w13)
            down.copy_(w2)
        else:
            raise RuntimeError(f"unexpected expert layout {tuple(gu.shape)} {tuple(down.shape)}")
        return
    for idx in range(e):  # ModuleList of per-expert MLPs
        m = ex[idx]
        names = [("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj")]
        for g_name, u_name, d_name in names:
            if hasattr(m, g_name):
                getattr(m, g_name).weight.copy_(w13[idx, :i])
                getattr(m, u_name).weight.copy_(w13[idx, i:])
                getattr(m, d_name).weight.copy_(w2[idx])
                break
        else:
            raise RuntimeError(f"unexpected expert module {type(m).__name__}")


def hf_forward(block, x):
    out = block(x.unsqueeze(0))
    if isinstance(out, tuple):
        out = out[0]
    return out.reshape(x.shape)


# ---------------------------------------------------------------- timing

def time_cuda(fn, iters, warmup):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for n in range(iters):
        starts[n].record()
        fn()
        ends[n].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def free_memory():
    try:
        free, _ = torch.cuda.mem_get_info()
        return free
    except Exception:  # noqa: BLE001
        return None


def run_cell(fn, iters, warmup, need_bytes=0):
    """(ms, None) or (None, reason)."""
    free = free_memory()
    if need_bytes and free is not None and need_bytes > 0.85 * free:
        return None, f"n/a: needs ~{need_bytes / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"
    try:
        with torch.inference_mode():
            return time_cuda(fn, iters, warmup), None
    except torch.cuda.OutOfMemoryError as e:
        return None, f"OOM: {short(e)}"
    except Exception as e:  # noqa: BLE001
        return None, short(e)
    finally:
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - the cell already failed; report that
            pass


def bench_shape(name, shape, token_counts, variants, iters, warmup, device, bandwidth):
    h, i, e, k = shape
    res = {"name": name, "H": h, "I": i, "E": e, "k": k, "tokens": token_counts,
           "variants": {}, "errors": {}, "notes": {}, "roofline_ms": {}, "best": {}}
    for t in token_counts:
        res["roofline_ms"][str(t)] = roofline_ms(shape, t, bandwidth)

    def record(variant, t, ms, err):
        res["variants"].setdefault(variant, {})[str(t)] = ms
        if err:
            res["errors"].setdefault(variant, {})[str(t)] = err
        shown = f"{ms:.3f} ms" if ms is not None else err
        log(f"  {name} {variant:<26} T={t:<6} {shown}")

    try:
        wr, w13, w2 = make_weights(shape, device, seed=1)
    except Exception as e:  # noqa: BLE001
        res["notes"]["weights"] = short(e)
        log(f"  {name}: cannot make weights: {short(e)}")
        return res
    expert_bytes = 3 * h * i * 2

    if "grouped_mm" in variants:
        gmm = grouped_mm_fn()
        for t in token_counts:
            if gmm is None:
                record("grouped_mm", t, None, "n/a: no torch._grouped_mm in this torch")
                continue
            x = make_input(t, h, device, seed=1000 + t)
            ms, err = run_cell(lambda: grouped_moe(x, wr, w13, w2, k, gmm), iters, warmup)
            record("grouped_mm", t, ms, err)
            del x

    for kind in HF_BLOCKS:
        wanted = [impl for impl in HF_IMPLS if f"{kind}[{impl}]" in variants or kind in variants]
        if not wanted:
            continue
        try:
            block, cfg = hf_build(kind, shape, device)
            with torch.no_grad():
                hf_load(block, wr, w13, w2)
        except Exception as e:  # noqa: BLE001
            res["notes"][kind] = f"cannot build: {short(e)}"
            log(f"  {name} {kind}: cannot build: {short(e)}")
            for impl in wanted:
                for t in token_counts:
                    record(f"{kind}[{impl}]", t, None, f"n/a: {short(e)}")
            continue
        offered = hf_experts_backends()
        res["notes"]["hf_experts_backends"] = offered
        if not hasattr(type(block.experts).forward, "__wrapped__"):
            res["notes"][kind] = ("experts forward is not wrapped by use_experts_implementation: "
                                  "the backend switch may have no effect")
        for impl in wanted:
            variant = f"{kind}[{impl}]"
            try:
                if impl != "eager" and offered is not None and impl not in offered:
                    raise RuntimeError(f"not offered by this transformers (has {offered})")
                set_impl(cfg, impl, block=block)
            except Exception as e:  # noqa: BLE001
                for t in token_counts:
                    record(variant, t, None, f"n/a: {short(e)}")
                continue
            oom_at = None
            for t in token_counts:
                if oom_at is not None:
                    record(variant, t, None, f"n/a: out of memory already at T={oom_at}")
                    continue
                need = t * k * expert_bytes if impl == "batched_mm" else 0
                x = make_input(t, h, device, seed=1000 + t)
                ms, err = run_cell(lambda: hf_forward(block, x), iters, warmup, need)
                if err and ("OOM" in err or "needs ~" in err):
                    oom_at = t
                record(variant, t, ms, err)
                del x
        del block
        torch.cuda.empty_cache()

    for t in token_counts:
        cells = [(v[str(t)], name_) for name_, v in res["variants"].items() if v.get(str(t)) is not None]
        if cells:
            ms, variant = min(cells)
            res["best"][str(t)] = {"ms": ms, "variant": variant}
    del wr, w13, w2
    torch.cuda.empty_cache()
    return res


def print_table(report):
    for shape in report["shapes"]:
        tokens = shape["tokens"]
        print(f"\n{shape['name']}: H={shape['H']} I={shape['I']} E={shape['E']} k={shape['k']}, "
              f"ms per layer (median of {report['iters']}), {report['device']}")
        head = f"{'variant':<28}" + "".join(f"{'T=' + str(t):>11}" for t in tokens)
        print(head)
        rows = list(shape["variants"].items())
        rows.append(("best", {t: b["ms"] for t, b in shape["best"].items()}))
        rows.append(("roofline", shape["roofline_ms"]))
        for variant, cells in rows:
            line = f"{variant:<28}"
            for t in tokens:
                ms = cells.get(str(t))
                line += f"{ms:>11.3f}" if ms is not None else f"{'n/a':>11}"
            print(line)
        for variant, errs in shape["errors"].items():
            first = next(iter(errs.items()))
            print(f"  n/a {variant}: T={first[0]}: {first[1]}")
        for what, note in shape["notes"].items():
            print(f"  note {what}: {note}")
    sys.stdout.flush()


# ---------------------------------------------------------------- --self-check

def self_check():
    """grouped_mm MoE (and transformers' blocks, where they run) against the
    float32 per-expert loop on small shapes; exit status 0 when all agree."""
    if torch is None:
        print(f"FAIL self-check: torch not importable ({TORCH_ERROR})")
        return 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    failures = 0
    gmm = grouped_mm_fn()
    print(f"self-check on {device}, torch {torch.__version__}, transformers {hf_versions()}")
    # H != 2I so a transposed expert layout cannot pass for the plain one
    for shape, tokens in (((192, 128, 8, 2), 100), ((320, 64, 16, 4), 7), ((256, 96, 64, 8), 33)):
        h, i, e, k = shape
        wr, w13, w2 = make_weights(shape, device, seed=7)
        x = make_input(tokens, h, device, seed=11)
        routing = route(x.float(), wr.float(), k)
        ref = naive_moe(x, wr, w13, w2, k, routing)
        scale = ref.abs().max().item()
        label = f"H={h} I={i} E={e} k={k} T={tokens}"
        if gmm is None:
            print(f"FAIL grouped_mm {label}: no torch._grouped_mm")
            failures += 1
        else:
            try:
                with torch.inference_mode():
                    got = grouped_moe(x, wr, w13, w2, k, gmm, routing).float()
                rel = (got - ref).abs().max().item() / scale
                ok = rel < 2e-2 and bool(torch.isfinite(got).all()) and scale > 0
                print(f"{'PASS' if ok else 'FAIL'} grouped_mm {label}: max rel err {rel:.2e}")
                failures += 0 if ok else 1
            except Exception as e:  # noqa: BLE001
                print(f"FAIL grouped_mm {label}: {short(e)}")
                failures += 1
        # transformers' blocks route for themselves in bf16, so a token whose
        # k-th and (k+1)-th logits nearly tie may pick another expert: these
        # count as agreeing when 95% of the tokens match within 2e-2 (info).
        for kind in HF_BLOCKS:
            try:
                block, cfg = hf_build(kind, shape, device)
                with torch.no_grad():
                    hf_load(block, wr, w13, w2)
            except Exception as e:  # noqa: BLE001
                print(f"INFO {kind} {label}: cannot build ({short(e)})")
                continue
            for impl in HF_IMPLS:
                try:
                    set_impl(cfg, impl, block=block)
                    with torch.inference_mode():
                        got = hf_forward(block, x).float()
                    per_token = (got - ref).abs().amax(dim=1) / scale
                    frac = (per_token < 2e-2).float().mean().item()
                    print(f"INFO {kind}[{impl}] {label}: {frac * 100:.0f}% of tokens within 2e-2, "
                          f"max rel err {per_token.max().item():.2e}")
                except Exception as e:  # noqa: BLE001
                    print(f"INFO {kind}[{impl}] {label}: n/a ({short(e)})")
            del block
    print(f"self-check: {'PASS' if failures == 0 else 'FAIL'} ({failures} failed)")
    return 1 if failures else 0


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", type=parse_shape,
                    help=f"{', '.join(SHAPES)} or H,I,E,k (repeatable; default qwen3 and mixtral)")
    ap.add_argument("--tokens", default="1,16,128,1024,4096", help="token counts, comma-separated")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations per cell (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default="all",
                    help="comma-separated: grouped_mm, hf_mixtral, hf_qwen3_moe, or "
                         "hf_mixtral[eager] ...; default all")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--self-check", action="store_true",
                    help="check the grouped_mm MoE against a float32 per-expert loop and exit")
    args = ap.parse_args()

    if args.self_check:
        return self_check()
    if torch is None:
        print(f"peer_torch: torch not importable ({TORCH_ERROR})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("peer_torch: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    try:
        tokens = [int(t) for t in args.tokens.split(",") if t]
        assert tokens and min(tokens) >= 1
    except (ValueError, AssertionError):
        ap.error(f"--tokens {args.tokens}: positive integers, comma-separated")
    variants = {"grouped_mm", *HF_BLOCKS} if args.variants == "all" else set(args.variants.split(","))
    shapes = args.shape or [parse_shape("qwen3"), parse_shape("mixtral")]

    device = "cuda"
    name = torch.cuda.get_device_name(0)
    bandwidth = hbm_bandwidth(name)
    report = {"device": name, "torch": torch.__version__, "transformers": hf_versions(),
              "iters": args.iters, "warmup": args.warmup, "hbm_bytes_per_s": bandwidth,
              "peak_flops": PEAK_FLOPS, "shapes": []}
    log(f"peer_torch: {name}, torch {report['torch']}, transformers {report['transformers']}")
    started = time.time()
    for shape_name, shape in shapes:
        try:
            report["shapes"].append(bench_shape(shape_name, shape, tokens, variants, args.iters,
                                                args.warmup, device, bandwidth))
        except Exception as e:  # noqa: BLE001 - one shape never stops the next
            traceback.print_exc()
            report["shapes"].append({"name": shape_name, "H": shape[0], "I": shape[1],
                                     "E": shape[2], "k": shape[3], "tokens": tokens,
                                     "variants": {}, "errors": {}, "best": {},
                                     "notes": {"shape": short(e)},
                                     "roofline_ms": {str(t): roofline_ms(shape, t, bandwidth)
                                                     for t in tokens}})
        if args.json:  # written after every shape, so a killed run keeps what it did
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    report["seconds"] = round(time.time() - started, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print_table(report)
    ran = sorted({v for s in report["shapes"] for v, cells in s["variants"].items()
                  if any(ms is not None for ms in cells.values())})
    print(f"\nvariants that ran: {', '.join(ran) if ran else 'none'}")
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
