"""``vars-deq maps``: attention-map overlays of a checkpoint on clean and corrupted images.

One row per image; one column per model and image variant: the clean image and each requested
corruption, for the trained model and (by default) for an untrained model of the same
architecture, freshly initialized, side by side, so what training changed is visible. Each
panel is the mean map over layers (or one chosen layer) of :func:`vars_deq.attention_maps`
over the image, with the model's prediction under it (green when it is the true label, red
when not) and one colour bar for the map scale.
"""

from __future__ import annotations

import argparse

from .common import add_runtime_options, check_output, checkpoint_or_default, setup_runtime

NAME = "maps"
HELP = "attention-map overlays (clean vs corrupted, trained vs untrained) as PNG"
DESCRIPTION = ("Attention maps of a checkpoint over clean and corrupted images, for the trained model and an "
               "untrained one of the same architecture side by side, with each model's predictions and a "
               "colour bar; a PNG.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..eval.corruptions import CORRUPTIONS, SEVERITIES

    p.add_argument("--checkpoint", default=None, help="a vars-deq checkpoint (default: the shipped VARS-SD digits one)")
    p.add_argument("--images", default=None,
                   help="image file or folder (default: digits test images, whose true labels are then shown)")
    p.add_argument("--num-images", type=int, default=6)
    p.add_argument("--corruptions", nargs="*", default=["gaussian_noise", "contrast"], choices=sorted(CORRUPTIONS),
                   metavar="NAME", help=f"from {', '.join(sorted(CORRUPTIONS))} (default %(default)s; none: clean only)")
    p.add_argument("--severity", type=int, default=3, choices=SEVERITIES)
    p.add_argument("--layer", type=int, default=None, help="one layer's map (default: mean over layers)")
    p.add_argument("--compare-untrained", action=argparse.BooleanOptionalAction, default=True,
                   help="also show an untrained model of the same architecture (default: on)")
    p.add_argument("--seed", type=int, default=0, help="seeds the corruptions' noise and the untrained model")
    p.add_argument("--output", default="maps.png", help="PNG to write (default %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_options(p)


def _panel(model, x, layer):
    """(maps (B, H, W) over the image, predictions (B,)) of ``model`` on images ``x``."""
    import torch

    from ..models.maps import attention_maps

    m = attention_maps(model, x)  # (B, layers, h, w)
    m = m.mean(1) if layer is None else m[:, layer]
    m = torch.nn.functional.interpolate(m[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    with torch.no_grad():
        predictions = model.eval()(x).argmax(-1)
    return m.cpu(), predictions.cpu()


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from ..data import load_digits_split, load_images, model_input_size
    from ..eval.corruptions import corrupt
    from ..plots import plot_attention_maps
    from ..train.checkpoint import model_from_checkpoint
    from ..train.factory import apply_layer_options, create_model

    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    out = check_output(args.output, args.force)
    device = setup_runtime(args)
    ckpt_path = checkpoint_or_default(args.checkpoint)
    trained, ckpt = model_from_checkpoint(ckpt_path)
    depth = len(getattr(trained, "blocks", ()))
    if args.layer is not None and not 0 <= args.layer < depth:
        raise ValueError(f"--layer must be in 0..{depth - 1} for {ckpt['model_name']}, got {args.layer}")
    models = {"trained": trained}
    if args.compare_untrained:
        torch.manual_seed(args.seed)
        untrained = create_model(ckpt["model_name"], dict(ckpt["model_kwargs"]))
        apply_layer_options(untrained, ckpt["model_name"], dict(ckpt["config"].get("layer_options") or {}))
        models["untrained"] = untrained
    size = model_input_size(trained)
    if args.images:
        images, labels = load_images(args.images, size, args.num_images), None
    else:
        test = load_digits_split()[1]
        images, labels = test.tensors[0][: args.num_images], test.tensors[1][: args.num_images]
    variants = {"clean": images}
    for name in args.corruptions:
        variants[f"{name} {args.severity}"] = corrupt(images, name, args.severity, seed=args.seed)
    panels = {}
    with tqdm(total=len(models) * len(variants), desc="maps", unit="panel", disable=args.no_progress) as bar:
        for kind, model in models.items():
            model = model.to(device)
            for label, x in variants.items():
                maps, predictions = _panel(model, x.to(device), args.layer)
                panels[f"{kind}: {label}"] = {"images": x, "maps": maps, "predictions": predictions}
                bar.update(1)
    layer = "mean over layers" if args.layer is None else f"layer {args.layer}"
    title = f"{ckpt['model_name']}: attention maps ({layer}) of {ckpt_path.name}"
    if args.compare_untrained:
        title += f" and of an untrained model of the same architecture (seed {args.seed})"
    if labels is not None:
        accs = [f"{kind} {int((panels[f'{kind}: clean']['predictions'] == labels).sum())}/{len(labels)}"
                for kind in models]
        title += "\nclean images classified correctly: " + ", ".join(accs)
    plot_attention_maps(panels, out, title, labels=labels)
    print(f"wrote {out}")
    return 0
