"""Evaluation: candidate-likelihood accuracy and forgetting metrics."""

from dowser.eval.likelihood import candidate_accuracy, candidate_logprobs
from dowser.eval.metrics import best_h, h_score, mean_stderr, upstream_at
from dowser.eval.perturbation import Perturbation, perturbation_kl

__all__ = [
    "Perturbation",
    "best_h",
    "candidate_accuracy",
    "candidate_logprobs",
    "h_score",
    "mean_stderr",
    "perturbation_kl",
    "upstream_at",
]
