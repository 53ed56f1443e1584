"""Forward+backward time of one VARS attention layer against the original VARS code (issue 12).

DeiT-Tiny shapes: batch B = 8, dim 192, 3 heads (head_dim d = 64, m = 2 d = 128 random features),
float32, CPU one thread by default. VARS-D runs on N = 197 tokens (class token + 14 x 14 grid);
VARS-SD on N = 196 (the original's SD has free static atoms on the grid and no class token).

Variants, timed interleaved (one round of every variant, then the next round: ABAB...), the
first round untimed; each call is forward, loss = <w, out>, backward:

- ``ours_d``: ``vd.VARSAttention(192, 3, qkv_bias=True, dictionary="d")`` with its defaults (the
  original's 5 ISTA steps, unrolled);
- ``ours_sd``: ``dictionary="sd", static_atoms="free", num_tokens=N`` (the original's VARS-SD);
- ``ours_d_deq``, ``ours_sd_deq``: the same layers with ``backward="implicit"``, whose forward is
  the DEQ preset (FISTA to a relative residual of 1e-2) and whose adjoint is damped by the layer's
  ridge (``LAYER_ADJOINT_RIDGE``, 1e-3: at this VARS-SD shape a 1e-2 solve leaves more atoms on a
  support than there are tokens, and the undamped support Gram is singular); ``--no-deq`` skips them;
- ``ours_d_compiled``, ``ours_sd_compiled`` (``--compile``): ``torch.compile`` of ``ours_d`` /
  ``ours_sd`` (the same modules and weights; the fixed-step forward traces whole), checked
  against the original like the eager ones; their counts are the eager twin's;
- ``original_d``, ``original_sd``: ``original_vars_d`` / ``original_vars_sd`` of
  tests/reference_vars.py (the independent reference of the original code) on leaf copies of
  ``ours_d`` / ``ours_sd``'s weights, mapped as tests/test_faithful.py maps them:

      W_qv = [W_q; W_v],  b_qv = [b_q; b_v],  w_feat = projection^T (H, d, m),
      static = static_atoms.weight (H, N, m),  W_proj, b_proj as they are.

Before timing, each pair's outputs must agree: ||ours - original|| / ||original|| < 1e-5 in
float32 (else the benchmark stops); the difference, and that of the weight gradients, are
recorded. Reported: median seconds per variant, the ratios ours / original, FlopCounterMode's
count of each variant's forward and forward+backward, the DEQ variants' forward statistics, and
the FLOP floor of the update at these shapes (:func:`flop_floor`). Do not read the times of a
shared machine as speed: run it alone.

    python benchmarks/bench_layer.py                 # DeiT-Tiny shapes, 20 rounds
    python benchmarks/bench_layer.py --compile       # and torch.compile of ours, same rounds
    python benchmarks/bench_layer.py --quick         # B=2, dim 24, N=17/16, one round

Results: <out>/layer.json and layer.png (default out: benchmarks/results/<device>/).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# the reference of the original code is test code (tests/reference_vars.py, checked against the
# layer by tests/test_faithful.py), not part of the library: import it from the tests folder
sys.path.insert(0, str(HERE.parent / "tests"))
import common  # noqa: E402
from reference_vars import original_vars_d, original_vars_sd  # noqa: E402

import vars_deq as vd  # noqa: E402

SHAPE = {"B": 8, "dim": 192, "heads": 3, "N_d": 197, "N_sd": 196}
QUICK_SHAPE = {"B": 2, "dim": 24, "heads": 3, "N_d": 17, "N_sd": 16}
LAM = 0.3
STEPS = 5
AGREEMENT_TOL = 1e-5
#: pair -> (our variant, the original's variant on its weights)
PAIRS = {"d": ("ours_d", "original_d"), "sd": ("ours_sd", "original_sd")}


# -- the original, on the layer's weights ---------------------------------------------------------


def reference_weights(layer: vd.VARSAttention) -> dict[str, torch.Tensor]:
    """Leaf copies of ``layer``'s weights in the original's layout (as tests/test_faithful.py maps them)."""
    weights = {
        "W_qv": torch.cat([layer.q.weight, layer.v.weight]),
        "b_qv": torch.cat([layer.q.bias, layer.v.bias]),
        "w_feat": layer.dynamic_atoms.projection.transpose(-1, -2),  # ours (H, m, d), the original's (H, d, m)
        "W_proj": layer.proj.weight,
        "b_proj": layer.proj.bias,
    }
    if layer.static_atoms is not None:
        weights["static"] = layer.static_atoms.weight  # (H, N, m), taken by original_vars_sd as is
    # the fixed features are a buffer of ours and a constant of the original's: no gradient either side
    return {k: t.detach().clone().requires_grad_(k != "w_feat") for k, t in weights.items()}


def reference_forward(weights: dict[str, torch.Tensor], num_heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> the original VARS-D (no "static" weight) or VARS-SD attention on ``weights``, lam 0.3, 5 steps."""
    w = weights
    if "static" in w:
        return lambda x: original_vars_sd(x, w["W_qv"], w["b_qv"], w["w_feat"], w["static"], w["W_proj"],
                                          w["b_proj"], num_heads, lam=LAM, steps=STEPS)
    return lambda x: original_vars_d(x, w["W_qv"], w["b_qv"], w["w_feat"], w["W_proj"], w["b_proj"], num_heads,
                                     lam=LAM, steps=STEPS)


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


def layer_configs(shape: dict, deq: bool) -> dict[str, tuple[str, dict]]:
    """Our variants: name -> (kind, VARSAttention keywords beyond dim, heads and qkv_bias)."""
    faithful = {"d": {"dictionary": "d"},
                "sd": {"dictionary": "sd", "static_atoms": "free", "num_tokens": shape["N_sd"]}}
    configs = {f"ours_{kind}": (kind, kw) for kind, kw in faithful.items()}
    if deq:
        configs.update({f"ours_{kind}_deq": (kind, {**kw, "backward": "implicit"}) for kind, kw in faithful.items()})
    return configs


def build_variants(shape: dict, device: torch.device, deq: bool = True
                   ) -> tuple[dict[str, Variant], dict[str, vd.VARSAttention], dict[str, dict]]:
    """(variants by name, our layers by name, the original's weights by pair)."""
    gen = torch.Generator().manual_seed(0)
    B, dim, H = shape["B"], shape["dim"], shape["heads"]
    inputs = {}
    for kind in ("d", "sd"):
        N = shape[f"N_{kind}"]
        inputs[kind] = (torch.randn(B, N, dim, generator=gen).to(device), torch.randn(B, N, dim, generator=gen).to(device))
    variants, layers = {}, {}
    for name, (kind, kwargs) in layer_configs(shape, deq).items():
        torch.manual_seed(0)  # a DEQ variant has its unrolled twin's weights
        layer = vd.VARSAttention(dim, H, qkv_bias=True, **kwargs).to(device)
        layers[name] = layer
        variants[name] = Variant(name, layer, list(layer.parameters()), *inputs[kind])
    weights = {}
    for pair, (ours, original) in PAIRS.items():
        weights[pair] = reference_weights(layers[ours])
        variants[original] = Variant(original, reference_forward(weights[pair], H),
                                     [t for t in weights[pair].values() if t.requires_grad], *inputs[pair])
    return variants, layers, weights


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a - b).norm() / b.norm()).item()


def agreement(pair: str, layer: vd.VARSAttention, weights: dict[str, torch.Tensor], ours: Variant,
              original: Variant) -> dict[str, float]:
    """Relative differences of the outputs and of the weight gradients (one loss <w, out>, the
    original's gradients mapped back to the layer's parameters); raises if the outputs differ by
    ``AGREEMENT_TOL`` or more: the timing would then compare two different layers."""
    out_diff = relative_difference(ours.output(), original.output())
    if not out_diff < AGREEMENT_TOL:
        raise RuntimeError(f"{ours.name} and {original.name} disagree: relative output difference {out_diff:.3g} "
                           f">= {AGREEMENT_TOL:g} (float32); the timing would compare different layers")
    ours.step()
    original.step()
    mine = [layer.q.weight, layer.v.weight, layer.q.bias, layer.v.bias, layer.proj.weight, layer.proj.bias]
    theirs = [weights["W_qv"], weights["b_qv"], weights["W_proj"], weights["b_proj"]]
    if pair == "sd":
        mine.append(layer.static_atoms.weight)
        theirs.append(weights["static"])
    got = torch.cat([p.grad.flatten() for p in mine])
    want = torch.cat([t.grad.flatten() for t in theirs])
    return {"output_rel_diff": out_diff, "weight_grad_rel_diff": relative_difference(got, want)}


def forward_stats(layer: vd.VARSAttention) -> dict[str, float]:
    """The latest forward's solver statistics (steps mean, residual max, converged fraction)."""
    return {k: float(v) for k, v in layer.last_stats.items()}


def counted_macs(variant: Variant) -> dict:
    with torch.no_grad():
        fwd, _ = common.count_flops(lambda: variant.run(variant.x))
    both, _ = common.count_flops(variant.step)
    return {"forward_macs_counted": fwd // 2, "forward_backward_macs_counted": both // 2}


def plot(rows: dict, ratios: dict, floors: dict, path: Path, title: str) -> None:
    plt = common.pyplot()
    names = list(rows)
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(11, 4.4))
    colors = ["#777777" if n.startswith("original") else "#4c72b0" if n.endswith("_deq") else "#dd8452" for n in names]
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
    ap.add_argument("--no-deq", action="store_true", help="skip the backward=\"implicit\" variants")
    ap.add_argument("--compile", action="store_true", help="add torch.compile of ours_d and ours_sd")
    args = ap.parse_args(argv)
    shape = QUICK_SHAPE if args.quick else SHAPE
    if args.quick:
        args.repeats = 1
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    device, out = common.setup(args)
    variants, layers, weights = build_variants(shape, device, deq=not args.no_deq)
    skipped = {f"ours_{kind}_deq": "--no-deq" for kind in PAIRS} if args.no_deq else {}
    pairs = dict(PAIRS)
    if args.compile:
        for pair, (ours, original) in PAIRS.items():
            v = variants[ours]
            variants[f"{ours}_compiled"] = Variant(f"{ours}_compiled", torch.compile(layers[ours]), v.params, v.x, v.w)
            layers[f"{ours}_compiled"] = layers[ours]
            pairs[f"{pair}_compiled"] = (f"{ours}_compiled", original)
    checks = {pair: agreement(pair.removesuffix("_compiled"), layers[ours], weights[pair.removesuffix("_compiled")],
                              variants[ours], variants[original])
              for pair, (ours, original) in pairs.items()}
    times: dict[str, list[float]] = {n: [] for n in variants}
    with warnings.catch_warnings():
        # an unconverged DEQ forward warns every call; its statistics are recorded instead
        warnings.simplefilter("ignore", vd.ConvergenceWarning)
        for round_ in range(args.repeats + 1):
            for name, variant in variants.items():
                _, seconds = common.timed(variant.step, device)
                if round_:
                    times[name].append(seconds)
        rows = {n: {"median_s": common.median(times[n]), "all_s": times[n],
                    **counted_macs(variants[n.removesuffix("_compiled")])}
                for n in variants}
    for name, layer in layers.items():
        rows[name]["forward_stats"] = forward_stats(layer)
    ratios = {pair: {"ours": ours, "original": original, "ratio": rows[ours]["median_s"] / rows[original]["median_s"],
                     **checks[pair]}
              for pair, (ours, original) in pairs.items()}
    d, H = shape["dim"] // shape["heads"], shape["heads"]
    floors = {"d": flop_floor(shape["B"], shape["N_d"], shape["dim"], H, 2 * d, 0),
              "sd": flop_floor(shape["B"], shape["N_sd"], shape["dim"], H, 2 * d, 2 * d)}
    result = {
        "benchmark": "layer",
        "quick": args.quick,
        "environment": common.environment(device),
        "setup": {**shape, "head_dim": d, "m": 2 * d, "lam": LAM, "steps": STEPS, "dtype": "float32",
                  "repeats": args.repeats, "order": "interleaved rounds (ABAB...), first round untimed",
                  "call": "forward, loss = <w, out>, backward into the layer's parameters",
                  "agreement_tol": AGREEMENT_TOL},
        "variants": rows,
        "skipped": skipped,
        "reference": {original: {"weights_from": ours, "function": f"tests/reference_vars.py original_vars_{pair}",
                                 "mapping": "W_qv = [q.weight; v.weight], b_qv = [q.bias; v.bias], w_feat = "
                                            "dynamic_atoms.projection^T, static = static_atoms.weight, proj as is "
                                            "(tests/test_faithful.py)"}
                      for pair, (ours, original) in PAIRS.items()},
        "ratios": ratios,
        "flop_floor": floors,
    }
    common.write_json(out / "layer.json", result)
    plot(rows, ratios, floors, out / "layer.png",
         f"one VARS layer, B={shape['B']} dim={shape['dim']} H={H} N={shape['N_d']}/{shape['N_sd']}, float32, "
         f"{common.device_label(device)}, median of {args.repeats}")
    print(f"{'variant':17s} {'median ms':>10s} {'fwd MMACs':>10s} {'fwd+bwd MMACs':>14s}")
    for n, r in rows.items():
        print(f"{n:17s} {r['median_s'] * 1e3:10.2f} {r['forward_macs_counted'] / 1e6:10.1f} "
              f"{r['forward_backward_macs_counted'] / 1e6:14.1f}"
              + (f"  forward steps {r['forward_stats']['steps']:.1f}, converged {r['forward_stats']['converged']:.0%}"
                 if n.endswith("_deq") else ""))
    for pair, r in ratios.items():
        print(f"{pair}: {r['ours']} / {r['original']} = {r['ratio']:.2f}x, relative difference output "
              f"{r['output_rel_diff']:.2g}, weight gradients {r['weight_grad_rel_diff']:.2g}")
    for kind, f in floors.items():
        print(f"floor {kind}: {f['forward_macs_dense_gram'] / 1e6:.1f} M multiply-adds per forward (dense Gram), "
              f"{f['forward_macs_structured_gram'] / 1e6:.1f} M (static Gram shared)")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"wrote {out / 'layer.json'} and layer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
