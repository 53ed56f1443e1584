"""`vars-deq maps`: attention-map overlays of a checkpoint on clean and corrupted images.

One row per image: the image, then for the clean image and for each requested corruption the
overlay of the mean map over layers (or one chosen layer), side by side in the style of the
paper's Figure 3. The maps are :func:`vars_deq.attention_maps`.
"""

from __future__ import annotations

from pathlib import Path

import torch


def add_maps_parser(sub) -> None:
    from .eval.corruptions import CORRUPTIONS

    p = sub.add_parser("maps", help="attention-map overlays (clean vs corrupted) as PNG",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="a vars-deq checkpoint (default: the shipped VARS-SD digits one)")
    p.add_argument("--images", default=None, help="image file or folder (default: digits test images)")
    p.add_argument("--num-images", type=int, default=6)
    p.add_argument("--corruptions", nargs="*", default=["gaussian_noise", "contrast"],
                   help=f"from {sorted(CORRUPTIONS)}")
    p.add_argument("--severity", type=int, default=3, choices=range(1, 6))
    p.add_argument("--layer", type=int, default=None, help="one layer's map (default: mean over layers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="maps.png")
    p.set_defaults(run=run_maps)


def run_maps(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .compare import default_checkpoint, load_images
    from .data import load_digits_split, model_input_size
    from .eval.corruptions import CORRUPTIONS, corrupt
    from .models.maps import attention_maps
    from .train.checkpoint import model_from_checkpoint

    unknown = [c for c in args.corruptions if c not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruption(s) {unknown}; valid: {sorted(CORRUPTIONS)}")
    ckpt_path = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    model, ckpt = model_from_checkpoint(ckpt_path)
    size = model_input_size(model)
    if args.images:
        images = load_images(args.images, size, args.num_images)
    else:
        images = load_digits_split()[1].tensors[0][: args.num_images]
    variants = {"clean": images}
    for name in args.corruptions:
        variants[f"{name} {args.severity}"] = corrupt(images, name, args.severity, seed=args.seed)
    maps = {}
    for label, x in variants.items():
        m = attention_maps(model, x)  # (B, layers, h, w)
        if args.layer is not None:
            if not 0 <= args.layer < m.shape[1]:
                raise ValueError(f"--layer must be in 0..{m.shape[1] - 1}, got {args.layer}")
            m = m[:, args.layer]
        else:
            m = m.mean(1)
        maps[label] = torch.nn.functional.interpolate(m[:, None], size=x.shape[-2:], mode="bilinear",
                                                      align_corners=False)[:, 0]
    rows, cols = images.shape[0], len(variants)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    for i in range(rows):
        for j, (label, x) in enumerate(variants.items()):
            ax = axes[i, j]
            img = x[i].permute(1, 2, 0).clamp(0, 1).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", interpolation="nearest")
            ax.imshow(maps[label][i].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1, interpolation="bilinear")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=9)
    layer = "mean over layers" if args.layer is None else f"layer {args.layer}"
    fig.suptitle(f"{ckpt['model_name']}: attention maps ({layer})", fontsize=10)
    fig.tight_layout()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")
    return 0
