"""Forward+backward time of one VARS attention layer against the original VARS code's update (issue 12).

DeiT-Tiny shapes: batch B = 8, dim 192, 3 heads (head_dim d = 64, m = 2 d = 128 random features),
float32, CPU one thread by default. VARS-D runs on N = 197 tokens (class token + 14 x 14 grid);
VARS-SD on N = 196 (the original's SD has free static atoms on the grid and no class token).

Variants, timed interleaved (one round of every variant, then the next round: ABAB...), the
first round untimed; each call is forward, loss = <w, out>, backward:

- ``ours_d``: ``vd.VARSAttention(192, 3, qkv_bias=True, dictionary="d")`` with its defaults;
- ``ours_sd_free``: ``dictionary="sd", static_atoms="free", num_tokens=N`` (the original's VARS-SD
  from our parts), recorded as skipped where this library version has no such option;
- ``ours_sd``: ``dictionary="sd"`` with its shipped (convolutional) static atoms;
- ``original_d``, ``original_sd``: :func:`reference_forward`, the original code's update written
  from the facts of the faithful-VARS issue, on the same weights as ``ours_d`` / ``ours_sd_free``
  (fresh free static atoms where ``ours_sd_free`` is skipped).

Reported: median seconds per variant, the ratios ours / original, the relative output difference
of each pair (0 up to rounding once our defaults are the original's), FlopCounterMode's count of
each variant's forward and forward+backward, and the FLOP floor of the update at these shapes
(:func:`flop_floor`). Do not read the times of a shared machine as speed: run it alone.

    python benchmarks/bench_layer.py                 # DeiT-Tiny shapes, 20 rounds
    python benchmarks/bench_layer.py --quick         # B=2, dim 24, N=17/16, one round

Results: <out>/layer.json and layer.png (default out: benchmarks/results/<device>/).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import vars_deq as vd  # noqa: E402

SHAPE = {"B": 8, "dim": 192, "heads": 3, "N_d": 197, "N_sd": 196}
QUICK_SHAPE = {"B": 2, "dim": 24, "heads": 3, "N_d": 17, "N_sd": 16}
LAM = 0.3
STEPS = 5
PAIRS = {"d": ("ours_d", "original_d"), "sd_free": ("ours_sd_free", "original_sd"),
         "sd_shipped": ("ours_sd", "original_sd")}


# -- the original's update ------------------------------------------------------------------------


def soft_threshold(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """S_t(x) = sign(x) max(|x| - t, 0)."""
    return torch.sign(x) * F.relu(x.abs() - t)


def reference_forward(kind: str, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The original VARS attention ("d" or "sd") on x (B, N, dim), from its published facts.

    With q = x W_q + b_q, v = x W_v + b_v split into H heads of d channels, per sample and head:

        phi(u) = exp(u w - |u|^2 / 2) / sqrt(m),  u = q / |q|,  w (d, m) fixed, m = 2 d
        D = normalize_tokens(phi(q))                    (VARS-D)
        D = normalize_tokens([phi(q), S]),  S (N, m)    (VARS-SD: free static atoms)
        b = D^T v,  G = D^T D,  L = max_i sum_j |G_ij| + 1   (Gershgorin bound + 1, detached)
        z_0 = S_lam(b),  z_{k+1} = S_{lam/L}(z_k - (G z_k - b) / L),  k < 5,  lam = 0.3
        out = proj(D z_5)

    ``weights``: q_weight, q_bias, v_weight, v_bias, proj_weight, proj_bias, features (H, d, m),
    and for "sd" static (1, H, N, m). A stand-in for tests/reference_vars.py's ``original_vars_d``
    and ``original_vars_sd`` until those land.
    """
    if kind not in ("d", "sd"):
        raise ValueError(f"kind must be one of ('d', 'sd'), got {kind!r}")
    B, N, _ = x.shape
    w = weights["features"]
    H, d, m = w.shape
    q = F.linear(x, weights["q_weight"], weights["q_bias"]).reshape(B, N, H, d).transpose(1, 2)
    v = F.linear(x, weights["v_weight"], weights["v_bias"]).reshape(B, N, H, d).transpose(1, 2)
    u = F.normalize(q, dim=-1)
    atoms = torch.exp(u @ w - 0.5 * u.pow(2).sum(-1, keepdim=True)) / math.sqrt(m)
    if kind == "sd":
        atoms = torch.cat([atoms, weights["static"].expand(B, -1, -1, -1)], dim=-1)
    D = F.normalize(atoms, dim=-2)
    Dt = D.transpose(-1, -2)
    b, G = Dt @ v, Dt @ D
    L = (G.abs().sum(-1).amax(-1) + 1).detach()[..., None, None]
    z = soft_threshold(b, LAM)
    for _ in range(STEPS):
        z = soft_threshold(z - (G @ z - b) / L, LAM / L)
    out = (D @ z).transpose(1, 2).reshape(B, N, H * d)
    return F.linear(out, weights["proj_weight"], weights["proj_bias"])


def layer_weights(layer: vd.VARSAttention, kind: str, num_tokens: int,
                  gen: torch.Generator) -> tuple[dict, bool | None]:
    """Leaf copies of ``layer``'s weights in :func:`reference_forward`'s layout, and whether the
    static atoms are the layer's own (else drawn from ``gen``; None for "d", which has none)."""
    features = next(mod for mod in layer.modules() if isinstance(mod, vd.PerformerDictionary))
    weights = {
        "q_weight": layer.q.weight, "q_bias": layer.q.bias, "v_weight": layer.v.weight, "v_bias": layer.v.bias,
        "proj_weight": layer.proj.weight, "proj_bias": layer.proj.bias,
        "features": features.projection.transpose(-1, -2),
    }
    shared = None
    if kind == "sd":
        static = getattr(layer.static_atoms, "weight", None)
        shared = isinstance(static, torch.Tensor) and static.dim() == 3
        H, m = features.projection.shape[:2]
        weights["static"] = static[None] if shared else torch.randn(1, H, num_tokens, m, generator=gen)
    device = layer.v.weight.device
    return {k: t.detach().clone().to(device).requires_grad_() for k, t in weights.items()}, shared


# -- FLOPs ----------------------------------------------------------------------------------------


def flop_floor(B: int, N: int, dim: int, H: int, m_dynamic: int, m_static: int, steps: int = STEPS) -> dict:
    """Multiply-adds of the matrix products of one forward, per layer, at these shapes.

    Per sample and head, with M = m_dynamic + m_static atoms and C = d channels:
    features N d m_dynamic, b = D^T v: N M C, G = D^T D: N M^2, steps: K M^2 C, decode D z: N M C;
    per sample the q, v and output projections: N dim (3 H d). "structured" shares the static
    block D_s^T D_s of the Gram across the batch (it does not depend on the input): per sample
    N (m_d^2 + 2 m_d m_s) plus N m_s^2 once per head.
    """
    d = dim // H
    M = m_dynamic + m_static
    linear = B * N * dim * 3 * H * d
    per_problem = N * d * m_dynamic + 2 * N * M * d + steps * M * M * d
    dense = linear + B * H * (per_problem + N * M * M)
    structured = linear + B * H * (per_problem + N * (m_dynamic ** 2 + 2 * m_dynamic * m_static)) + H * N * m_static ** 2
    return {"forward_macs_dense_gram": dense, "forward_macs_structured_gram": structured,
            "projection_macs": linear,
            "formula": "per (sample, head): N d m_d + 2 N M d + K M^2 d + Gram (dense N M^2; structured "
                       "N (m_d^2 + 2 m_d m_s) + N m_s^2 / B); plus B N dim 3 H d for the q, v, proj Linears"}


# -- variants -------------------------------------------------------------------------------------


class Variant:
    """One timed callable: forward, loss <w, out>, backward into its parameters."""

    def __init__(self, name: str, run: Callable[[torch.Tensor], torch.Tensor], params: list[torch.Tensor],
                 x: torch.Tensor, cotangent: torch.Tensor):
        self.name, self.run, self.params, self.x, self.w = name, run, params, x, cotangent

    def output(self) -> torch.Tensor:
        with torch.no_grad():
            return self.run(self.x)

    def step(self) -> None:
        for p in self.params:
            p.grad = None
        (self.run(self.x) * self.w).sum().backward()


def build_variants(shape: dict, device: torch.device) -> tuple[dict[str, Variant], dict[str, str], dict]:
    """(variants by name, skipped name -> reason, notes)."""
    gen = torch.Generator().manual_seed(0)
    B, dim, H = shape["B"], shape["dim"], shape["heads"]
    inputs = {}
    for kind in ("d", "sd"):
        N = shape[f"N_{kind}"]
        inputs[kind] = (torch.randn(B, N, dim, generator=gen).to(device), torch.randn(B, N, dim, generator=gen).to(device))
    configs = {
        "ours_d": ("d", {"dictionary": "d"}),
        "ours_sd_free": ("sd", {"dictionary": "sd", "static_atoms": "free", "num_tokens": shape["N_sd"]}),
        "ours_sd": ("sd", {"dictionary": "sd"}),
    }
    variants, skipped, layers = {}, {}, {}
    for name, (kind, kwargs) in configs.items():
        torch.manual_seed(0)
        try:
            layer = vd.VARSAttention(dim, H, qkv_bias=True, **kwargs).to(device)
        except (TypeError, ValueError) as e:  # an option this library version does not have
            skipped[name] = f"VARSAttention(**{kwargs}) failed: {e}"
            continue
        layers[name] = layer
        variants[name] = Variant(name, layer, list(layer.parameters()), *inputs[kind])
    notes = {}
    for name, kind, source in (("original_d", "d", "ours_d"), ("original_sd", "sd", "ours_sd_free")):
        source = source if source in layers else "ours_sd"
        weights, shared = layer_weights(layers[source], kind, shape["N_sd"], gen)
        notes[name] = {"weights_from": source, "static_atoms_shared": shared}
        variants[name] = Variant(name, lambda x, kind=kind, weights=weights: reference_forward(kind, x, weights),
                                 list(weights.values()), *inputs[kind])
    return variants, skipped, notes


def counted_macs(variant: Variant) -> dict:
    with torch.no_grad():
        fwd, _ = common.count_flops(lambda: variant.run(variant.x))
    both, _ = common.count_flops(variant.step)
    return {"forward_macs_counted": fwd // 2, "forward_backward_macs_counted": both // 2}


def plot(rows: dict, ratios: dict, floors: dict, path: Path, title: str) -> None:
    plt = common.pyplot()
    names = list(rows)
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(11, 4.4))
    colors = ["#777777" if n.startswith("original") else "#dd8452" for n in names]
    ms = [rows[n]["median_s"] * 1e3 for n in names]
    bars = ax_t.bar(names, ms, color=colors)
    common.label_bars(ax_t, bars, [f"{v:.3g}" for v in ms])
    ax_t.set_ylabel("forward+backward, median (ms)")
    ax_t.set_title("; ".join(f"{k}: {v['ratio']:.2f}x" for k, v in ratios.items()) or "time", fontsize=8)
    ax_t.tick_params(axis="x", labelrotation=25, labelsize=8)
    fwd = [rows[n]["forward_macs_counted"] / 1e6 for n in names]
    ax_f.bar(names, fwd, color=colors, label="forward, counted (FlopCounterMode / 2)")
    for kind, floor in floors.items():
        ax_f.axhline(floor["forward_macs_dense_gram"] / 1e6, ls="--", lw=1,
                     color="tab:blue" if kind == "d" else "tab:red", label=f"floor {kind} (dense Gram)")
        if kind == "sd":
            ax_f.axhline(floor["forward_macs_structured_gram"] / 1e6, ls=":", lw=1, color="tab:red",
                         label="floor sd (static Gram shared)")
    ax_f.set_ylabel("forward multiply-adds (M)")
    ax_f.tick_params(axis="x", labelrotation=25, labelsize=8)
    ax_f.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    ap = common.parser(__doc__, default_threads=1)
    ap.add_argument("--repeats", type=int, default=20, help="timed rounds (after one untimed round)")
    args = ap.parse_args(argv)
    shape = QUICK_SHAPE if args.quick else SHAPE
    if args.quick:
        args.repeats = 1
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    device, out = common.setup(args)
    variants, skipped, notes = build_variants(shape, device)
    times: dict[str, list[float]] = {n: [] for n in variants}
    for round_ in range(args.repeats + 1):
        for name, variant in variants.items():
            _, seconds = common.timed(variant.step, device)
            if round_:
                times[name].append(seconds)
    rows = {n: {"median_s": common.median(times[n]), "all_s": times[n], **counted_macs(v)}
            for n, v in variants.items()}
    ratios = {}
    for pair, (ours, original) in PAIRS.items():
        if ours in rows:
            a, b = variants[ours].output(), variants[original].output()
            ratios[pair] = {"ours": ours, "original": original, "ratio": rows[ours]["median_s"] / rows[original]["median_s"],
                            "output_rel_diff": ((a - b).norm() / b.norm()).item()}
    d, H = shape["dim"] // shape["heads"], shape["heads"]
    floors = {"d": flop_floor(shape["B"], shape["N_d"], shape["dim"], H, 2 * d, 0),
              "sd": flop_floor(shape["B"], shape["N_sd"], shape["dim"], H, 2 * d, 2 * d)}
    result = {
        "benchmark": "layer",
        "quick": args.quick,
        "environment": common.environment(device),
        "setup": {**shape, "head_dim": d, "m": 2 * d, "lam": LAM, "steps": STEPS, "dtype": "float32",
                  "repeats": args.repeats, "order": "interleaved rounds (ABAB...), first round untimed",
                  "call": "forward, loss = <w, out>, backward into the layer's parameters"},
        "variants": rows,
        "skipped": skipped,
        "reference": notes,
        "ratios": ratios,
        "flop_floor": floors,
    }
    common.write_json(out / "layer.json", result)
    plot(rows, ratios, floors, out / "layer.png",
         f"one VARS layer, B={shape['B']} dim={shape['dim']} H={H} N={shape['N_d']}/{shape['N_sd']}, float32, "
         f"{common.device_label(device)}, median of {args.repeats}")
    print(f"{'variant':14s} {'median ms':>10s} {'fwd MMACs':>10s} {'fwd+bwd MMACs':>14s}")
    for n, r in rows.items():
        print(f"{n:14s} {r['median_s'] * 1e3:10.2f} {r['forward_macs_counted'] / 1e6:10.1f} "
              f"{r['forward_backward_macs_counted'] / 1e6:14.1f}")
    for pair, r in ratios.items():
        print(f"{pair}: {r['ours']} / {r['original']} = {r['ratio']:.2f}x, output relative difference "
              f"{r['output_rel_diff']:.2g}")
    for kind, f in floors.items():
        print(f"floor {kind}: {f['forward_macs_dense_gram'] / 1e6:.1f} M multiply-adds per forward (dense Gram), "
              f"{f['forward_macs_structured_gram'] / 1e6:.1f} M (static Gram shared)")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"wrote {out / 'layer.json'} and layer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
