#!/usr/bin/env python3
"""make_oracle: independent float64 numpy reference for the MoE layer forward
(DESIGN §4), written next to tiny HF-style checkpoints of three model
families, so that tests/test_oracle.c can run moed's CPU engine on the same
checkpoint and compare.

    python3 tests/oracle/make_oracle.py OUTDIR [--seed N] [--tokens T] [--only NAME]

writes, for each model NAME in (mixtral, qwen_moe, deepseek_v3), OUTDIR/NAME/:

    config.json                  HF config keys (model_type, hidden_size, ...)
    *.safetensors (+ index)      weights, written by hand with `struct`:
                                   mixtral      bf16, one model.safetensors
                                   qwen_moe     f16,  one model.safetensors
                                   deepseek_v3  f32,  two shards +
                                                model.safetensors.index.json
    input_L{layer}.f32           x [T, H] float32, raw little-endian
    expected_L{layer}.f32        MoE output [T, H] float32, computed in float64

for every MoE layer. The expected output is computed from the SAME weights
the checkpoint holds (rounded to bf16/f16 first), so the only difference
left between the engine and this oracle is float32 vs float64 arithmetic.

Routing near-ties. The engine routes in float32, this oracle in float64; if
a token's k-th and (k+1)-th best selection scores (or, for DeepSeek-V3, the
topk_group-th and next group scores) are closer than TIE_MARGIN, the two
could legitimately pick different experts and the outputs would differ by
O(1). Reproducing float32 rounding exactly is not possible from numpy (its
matmul order is not the engine's), so instead such a token's input is drawn
again until every decision has a margin of at least TIE_MARGIN — far above
float32 error on O(1) logits (~1e-6), so both sides make the same choice.

Each run uses fresh random inputs and weights unless --seed is given; the
seed is printed so a failure can be replayed. No torch: numpy only.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np

TIE_MARGIN = 1e-4
DEFAULT_TOKENS = 37

MODELS = {
    "mixtral": {
        "config": {
            "model_type": "mixtral",
            "architectures": ["MixtralForCausalLM"],
            "hidden_size": 32,
            "intermediate_size": 16,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "num_hidden_layers": 2,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
        },
        "naming": "mixtral", "dtype": "BF16", "shards": 1,
        "H": 32, "I": 16, "E": 8, "k": 2, "Is": 0, "layers": [0, 1],
        "routing": "softmax_topk", "norm_topk_prob": True,
    },
    "qwen_moe": {
        "config": {
            "model_type": "qwen2_moe",
            "architectures": ["Qwen2MoeForCausalLM"],
            "hidden_size": 32,
            "intermediate_size": 64,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 24,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "norm_topk_prob": False,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "num_hidden_layers": 2,
            "hidden_act": "silu",
            "torch_dtype": "float16",
        },
        "naming": "qwen_moe", "dtype": "F16", "shards": 1,
        "H": 32, "I": 16, "E": 8, "k": 2, "Is": 24, "layers": [0, 1],
        "routing": "softmax_topk", "norm_topk_prob": False, "shared_gate": True,
    },
    "deepseek_v3": {
        "config": {
            "model_type": "deepseek_v3",
            "architectures": ["DeepseekV3ForCausalLM"],
            "hidden_size": 32,
            "intermediate_size": 64,
            "moe_intermediate_size": 16,
            "n_routed_experts": 16,
            "n_shared_experts": 1,
            "num_experts_per_tok": 4,
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 2.5,
            "first_k_dense_replace": 1,
            "moe_layer_freq": 1,
            "num_hidden_layers": 3,
            "norm_topk_prob": True,
            "scoring_func": "sigmoid",
            "topk_method": "noaux_tc",
            "hidden_act": "silu",
            "torch_dtype": "float32",
        },
        "naming": "deepseek_v3", "dtype": "F32", "shards": 2,
        "H": 32, "I": 16, "E": 16, "k": 4, "Is": 16, "layers": [1, 2],
        "routing": "sigmoid_group_topk", "norm_topk_prob": True,
        "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "bias": True,
    },
}


# ---- dtype rounding and the safetensors writer ----

def round_to_dtype(a, dtype):
    """float64 array -> (float64 values exactly as stored, raw bytes)."""
    f32 = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "F32":
        return f32.astype(np.float64), f32.astype("<f4").tobytes()
    if dtype == "F16":
        h = f32.astype(np.float16)  # numpy rounds to nearest even
        return h.astype(np.float64), h.astype("<f2").tobytes()
    if dtype == "BF16":
        bits = f32.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
        b16 = bits.astype(np.uint16)
        back = (b16.astype(np.uint32) << 16).view(np.float32)
        return back.astype(np.float64), b16.astype("<u2").tobytes()
    raise ValueError(dtype)


def write_safetensors(path, tensors):
    """tensors: list of (name, dtype, shape, raw bytes). Header padded with
    spaces to a multiple of 8, as the reference writer does."""
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, _, raw in tensors:
            f.write(raw)


def read_safetensors(path):
    """Independent reader for the self-check: name -> float64 array."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        b, e = t["data_offsets"]
        raw = data[b:e]
        if t["dtype"] == "F32":
            a = np.frombuffer(raw, "<f4")
        elif t["dtype"] == "F16":
            a = np.frombuffer(raw, "<f2")
        elif t["dtype"] == "BF16":
            a = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            raise ValueError(t["dtype"])
        out[name] = a.astype(np.float64).reshape(t["shape"])
    return out


# ---- weights ----

def tensor_names(spec, layer, e=None):
    """HF names of the model's MoE tensors (DESIGN §9 naming schemes)."""
    L = layer
    if spec["naming"] == "mixtral":
        p = f"model.layers.{L}.block_sparse_moe"
        return {"router": f"{p}.gate.weight",
                "expert": [f"{p}.experts.{e}.{w}.weight" for w in ("w1", "w3", "w2")]}
    p = f"model.layers.{L}.mlp"
    shared = "shared_expert" if spec["naming"] == "qwen_moe" else "shared_experts"
    return {"router": f"{p}.gate.weight",
            "expert": [f"{p}.experts.{e}.{w}.weight"
                       for w in ("gate_proj", "up_proj", "down_proj")],
            "shared": [f"{p}.{shared}.{w}.weight" for w in ("gate_proj", "up_proj", "down_proj")],
            "shared_gate": f"{p}.shared_expert_gate.weight",
            "bias": f"{p}.gate.e_score_correction_bias"}


def make_weights(spec, rng):
    """Random weights for every MoE layer, rounded to the checkpoint dtype.
    Returns (per-layer dict of float64 arrays, list of tensors to write)."""
    H, I, E, Is, dt = spec["H"], spec["I"], spec["E"], spec["Is"], spec["dtype"]
    layers, tensors = {}, []

    def add(name, a):
        vals, raw = round_to_dtype(a, dt)
        tensors.append((name, dt, a.shape, raw))
        return vals

    for L in spec["layers"]:
        w = {}
        # Router scale ~2/sqrt(H): logits of std ~2, so routing is decisive.
        w["wg"] = add(tensor_names(spec, L)["router"], rng.standard_normal((E, H)) * 2 / np.sqrt(H))
        w["experts"] = []
        for e in range(E):
            n = tensor_names(spec, L, e)["expert"]
            w1 = add(n[0], rng.standard_normal((I, H)) / np.sqrt(H))
            w3 = add(n[1], rng.standard_normal((I, H)) / np.sqrt(H))
            w2 = add(n[2], rng.standard_normal((H, I)) / np.sqrt(I))
            w["experts"].append((w1, w3, w2))
        if Is:
            n = tensor_names(spec, L)["shared"]
            w["shared"] = (add(n[0], rng.standard_normal((Is, H)) / np.sqrt(H)),
                           add(n[1], rng.standard_normal((Is, H)) / np.sqrt(H)),
                           add(n[2], rng.standard_normal((H, Is)) / np.sqrt(Is)))
        if spec.get("shared_gate"):
            w["shared_gate"] = add(tensor_names(spec, L)["shared_gate"],
                                   rng.standard_normal((1, H)) / np.sqrt(H))
        if spec.get("bias"):
            w["bias"] = add(tensor_names(spec, L)["bias"], rng.standard_normal(E) * 0.1)
        layers[L] = w
    return layers, tensors


# ---- the math (DESIGN §4), float64 ----

def topk_desc(scores, k):
    """Indices of the k largest, ties to the lower index (stable sort)."""
    return np.argsort(-scores, kind="stable")[:k]


def margin(scores, k):
    """Gap between the k-th and (k+1)-th largest; inf if there is no (k+1)-th."""
    s = np.sort(scores[np.isfinite(scores)])[::-1]
    return s[k - 1] - s[k] if len(s) > k else np.inf


def route(spec, w, x):
    """One token: (expert ids, weights, smallest decision margin)."""
    logits = w["wg"] @ x
    k, E = spec["k"], spec["E"]
    if spec["routing"] == "softmax_topk":
        p = np.exp(logits - logits.max())
        p /= p.sum()
        ids = topk_desc(p, k)
        weights = p[ids]
        if spec["norm_topk_prob"]:
            weights = weights / weights.sum()
        return ids, weights, margin(logits, k)
    # sigmoid_group_topk (DeepSeek-V3, topk_method noaux_tc)
    s = 1.0 / (1.0 + np.exp(-logits))
    choice = s + w["bias"]
    n_group, topk_group = spec["n_group"], spec["topk_group"]
    groups = choice.reshape(n_group, E // n_group)
    group_score = np.sort(groups, axis=1)[:, ::-1][:, :2].sum(axis=1)
    kept = topk_desc(group_score, topk_group)
    # Experts of dropped groups cannot be chosen at all (DESIGN: "top-k
    # inside them"), so they are -inf, not 0.
    masked = np.full(E, -np.inf)
    for g in kept:
        sl = slice(g * (E // n_group), (g + 1) * (E // n_group))
        masked[sl] = choice[sl]
    ids = topk_desc(masked, k)
    weights = s[ids]
    if spec["norm_topk_prob"]:
        weights = weights / weights.sum()
    weights = weights * spec["routed_scaling_factor"]
    return ids, weights, min(margin(group_score, topk_group), margin(masked, k))


def silu(z):
    return z / (1.0 + np.exp(-z))


def ffn(w1, w3, w2, x):
    return w2 @ (silu(w1 @ x) * (w3 @ x))


def moe_forward(spec, w, x):
    """x [T,H] float64 -> (out [T,H] float64, per-token margins)."""
    out = np.zeros_like(x)
    margins = np.zeros(len(x))
    for t in range(len(x)):
        ids, weights, margins[t] = route(spec, w, x[t])
        for e, g in zip(ids, weights):
            out[t] += g * ffn(*w["experts"][e], x[t])
        if "shared" in w:
            y = ffn(*w["shared"], x[t])
            if "shared_gate" in w:
                y = y / (1.0 + np.exp(-(w["shared_gate"][0] @ x[t])))
            out[t] += y
    return out, margins


def make_inputs(spec, w, rng, n_tokens):
    """x [T,H] float32 whose routing decisions all have margin >= TIE_MARGIN
    (see the module docstring)."""
    x = rng.standard_normal((n_tokens, spec["H"])).astype(np.float32)
    for _ in range(1000):
        _, margins = moe_forward(spec, w, x.astype(np.float64))
        close = margins < TIE_MARGIN
        if not close.any():
            return x
        x[close] = rng.standard_normal((int(close.sum()), spec["H"])).astype(np.float32)
    raise RuntimeError("could not draw inputs without routing near-ties")


# ---- output and self-check ----

def write_checkpoint(spec, outdir, tensors):
    if spec["shards"] == 1:
        write_safetensors(os.path.join(outdir, "model.safetensors"), tensors)
        return
    n = spec["shards"]
    weight_map, total = {}, 0
    for s in range(n):
        fname = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        part = tensors[s::n]
        write_safetensors(os.path.join(outdir, fname), part)
        for name, _, _, raw in part:
            weight_map[name] = fname
            total += len(raw)
    with open(os.path.join(outdir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)


def load_checkpoint(outdir):
    index = os.path.join(outdir, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for fname in files:
        out.update(read_safetensors(os.path.join(outdir, fname)))
    return out


def self_check(spec, outdir, layer, x, expected):
    """Re-reads the checkpoint with an independent reader and recomputes the
    layer densely (every expert for every token, combined through a [T,E]
    gate matrix) — a second formulation that catches writer or indexing
    mistakes in the per-token loop above."""
    ck = load_checkpoint(outdir)
    names = tensor_names(spec, layer)
    E, k = spec["E"], spec["k"]
    xd = x.astype(np.float64)
    logits = xd @ ck[names["router"]].T
    gates = np.zeros((len(x), E))
    if spec["routing"] == "softmax_topk":
        top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        for t in range(len(x)):
            g = p[t, top[t]]
            gates[t, top[t]] = g / g.sum() if spec["norm_topk_prob"] else g
    else:
        for t in range(len(x)):
            w = {"wg": ck[names["router"]], "bias": ck[names["bias"]]}
            ids, g, _ = route(spec, w, xd[t])
            gates[t, ids] = g
    out = np.zeros_like(xd)
    for e in range(E):
        n = tensor_names(spec, layer, e)["expert"]
        h = silu(xd @ ck[n[0]].T) * (xd @ ck[n[1]].T)
        out += gates[:, e:e + 1] * (h @ ck[n[2]].T)
    if spec["Is"]:
        n = names["shared"]
        y = (silu(xd @ ck[n[0]].T) * (xd @ ck[n[1]].T)) @ ck[n[2]].T
        if spec.get("shared_gate"):
            y *= 1.0 / (1.0 + np.exp(-(xd @ ck[names["shared_gate"]].T)))
        out += y
    err = np.abs(out - expected).max()
    if err > 1e-9 * max(1.0, np.abs(expected).max()):
        raise AssertionError(f"self-check {spec['naming']} layer {layer}: max error {err}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir")
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    ap.add_argument("--only", choices=sorted(MODELS), action="append",
                    help="write only this model (repeatable); tests use it so that "
                         "parallel test processes never share a directory")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    print(f"make_oracle: seed {seed} (replay with --seed {seed})")
    for model_index, (name, spec) in enumerate(MODELS.items()):
        if args.only and name not in args.only:
            continue
        # One stream per model, so --seed N --only NAME replays that model
        # exactly as a full run with --seed N made it.
        rng = np.random.default_rng([seed, model_index])
        outdir = os.path.join(args.outdir, name)
        os.makedirs(outdir, exist_ok=True)
        for f in os.listdir(outdir):  # stale shards of an earlier run would confuse readers
            os.remove(os.path.join(outdir, f))
        with open(os.path.join(outdir, "config.json"), "w") as f:
            json.dump(spec["config"], f, indent=2)
        layers, tensors = make_weights(spec, rng)
        write_checkpoint(spec, outdir, tensors)
        for L in spec["layers"]:
            x = make_inputs(spec, layers[L], rng, args.tokens)
            expected, _ = moe_forward(spec, layers[L], x.astype(np.float64))
            self_check(spec, outdir, L, x, expected)
            x.astype("<f4").tofile(os.path.join(outdir, f"input_L{L}.f32"))
            expected.astype("<f4").tofile(os.path.join(outdir, f"expected_L{L}.f32"))
        print(f"make_oracle: {outdir}: layers {spec['layers']}, T={args.tokens}, "
              f"H={spec['H']}, E={spec['E']}, k={spec['k']}, {spec['dtype']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
