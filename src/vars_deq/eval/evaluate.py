"""Robustness evaluation: clean, per-corruption/severity and PGD accuracy, as JSON and a table."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .corruptions import CORRUPTIONS, FAMILIES, SEVERITIES, corrupt
from .pgd import pgd_attack

__all__ = ["evaluate_model", "format_table"]


def _generator(seed: int, tag: str, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{tag}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _family(name: str) -> str:
    return next(f for f, names in FAMILIES.items() if name in names)


def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    *,
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    pgd_eps: float | None = 0.03,
    pgd_steps: int = 10,
    pgd_step_size: float | None = None,
    seed: int = 0,
    batch_size: int = 256,
    limit: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Accuracy of ``model`` on clean, corrupted and PGD-attacked images of ``dataset``.

    Every corrupted batch and every PGD random start is seeded from (seed, what, batch index), so
    the result does not depend on the order of evaluation. Corruption means: per corruption over
    its severities, per family over its corruptions' means, and overall over the families.

    Args:
        corruptions: names from CORRUPTIONS (default all); an empty list skips them.
        severities: subset of 1..5.
        pgd_eps: L-inf radius in [0, 1] pixel units; None skips the attack.
        limit: evaluate the first ``limit`` examples only.
        progress: a progress bar that ticks per batch and evaluation (clean, each corruption and
            severity, PGD).
    """
    corruptions = list(CORRUPTIONS) if corruptions is None else list(corruptions)
    bad = [c for c in corruptions if c not in CORRUPTIONS]
    if bad:
        raise ValueError(f"unknown corruption(s) {bad}; valid: {sorted(CORRUPTIONS)}")
    severities = list(severities)
    bad_sev = [s for s in severities if s not in SEVERITIES]
    if bad_sev or not severities:
        raise ValueError(f"severities must be a non-empty subset of {SEVERITIES}, got {severities}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    device = torch.device(device)
    model = model.to(device).eval()

    counts = {"clean": 0, "pgd": 0, **{(c, s): 0 for c in corruptions for s in severities}}
    total = 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    from tqdm.auto import tqdm

    # one tick per model evaluation of a batch: clean, each (corruption, severity), PGD
    per_batch = 1 + len(corruptions) * len(severities) + (pgd_eps is not None)
    with tqdm(total=len(loader) * per_batch, desc="evaluate", unit="eval", disable=not progress, leave=False) as bar:
        for index, (x, y) in enumerate(loader):
            x, y = x.to(device), y.to(device)
            total += y.shape[0]
            with torch.no_grad():
                counts["clean"] += int((model(x).argmax(-1) == y).sum())
                bar.update(1)
                for c in corruptions:
                    for s in severities:
                        bar.set_postfix_str(f"{c} {s}", refresh=False)
                        xc = corrupt(x, c, s, seed=seed, index=index)
                        counts[(c, s)] += int((model(xc).argmax(-1) == y).sum())
                        bar.update(1)
            if pgd_eps is not None:
                bar.set_postfix_str("PGD", refresh=False)
                x_adv = pgd_attack(model, x, y, pgd_eps, pgd_steps, pgd_step_size,
                                   generator=_generator(seed, "pgd", index))
                with torch.no_grad():
                    counts["pgd"] += int((model(x_adv).argmax(-1) == y).sum())
                bar.update(1)
    if total == 0:
        raise ValueError("the evaluation dataset is empty")

    result: dict[str, Any] = {"num_examples": total, "seed": seed, "clean_acc": counts["clean"] / total}
    per_corruption = {}
    for c in corruptions:
        accs = {str(s): counts[(c, s)] / total for s in severities}
        per_corruption[c] = {"family": _family(c), "severity": accs, "mean": sum(accs.values()) / len(accs)}
    families = {}
    for fam, names in FAMILIES.items():
        means = [per_corruption[c]["mean"] for c in names if c in per_corruption]
        if means:
            families[fam] = sum(means) / len(means)
    result["corruptions"] = per_corruption
    result["families"] = families
    result["corruption_mean"] = sum(families.values()) / len(families) if families else None
    if pgd_eps is not None:
        step = pgd_step_size if pgd_step_size is not None else (2.5 * pgd_eps / pgd_steps if pgd_steps else 0.0)
        result["pgd"] = {"eps": pgd_eps, "steps": pgd_steps, "step_size": step, "random_start": True,
                         "acc": counts["pgd"] / total}
    else:
        result["pgd"] = None
    return result


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of an :func:`evaluate_model` result (accuracies in percent)."""
    lines = [f"examples: {result['num_examples']}", f"{'clean accuracy':<26}{100 * result['clean_acc']:7.2f}"]
    pgd = result.get("pgd")
    if pgd:
        label = f"PGD eps={pgd['eps']:g} x{pgd['steps']}"
        lines.append(f"{label:<26}{100 * pgd['acc']:7.2f}")
    per = result.get("corruptions") or {}
    if per:
        sevs = list(next(iter(per.values()))["severity"])
        lines.append("")
        lines.append(f"{'corruption':<18}{'family':<9}" + "".join(f"{'sev' + s:>7}" for s in sevs) + f"{'mean':>8}")
        for name, r in per.items():
            row = "".join(f"{100 * r['severity'][s]:7.2f}" for s in sevs)
            lines.append(f"{name:<18}{r['family']:<9}{row}{100 * r['mean']:8.2f}")
        lines.append("")
        for fam, m in result["families"].items():
            lines.append(f"{'mean ' + fam:<26}{100 * m:7.2f}")
        lines.append(f"{'mean over families':<26}{100 * result['corruption_mean']:7.2f}")
    return "\n".join(lines)
