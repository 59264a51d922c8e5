"""Comparing label maps: overlap and surface distances in millimetres."""

from sslmedsam2.metrics.evaluate import evaluate_paths
from sslmedsam2.metrics.surface import LabelScores, score_labels

__all__ = ["LabelScores", "evaluate_paths", "score_labels"]
