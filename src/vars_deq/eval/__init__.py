"""Robustness evaluation: image corruptions, PGD, and the evaluation loop."""

from .corruptions import CORRUPTIONS, FAMILIES, SEVERITIES, corrupt
from .evaluate import evaluate_model, format_table
from .pgd import pgd_attack, pgd_robust_counts

__all__ = ["CORRUPTIONS", "FAMILIES", "SEVERITIES", "corrupt", "evaluate_model", "format_table", "pgd_attack",
           "pgd_robust_counts"]
