"""Confidence that means what it says: temperature scaling and expected calibration error.

A network trained with cross-entropy is usually over- or under-confident. Temperature
scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017) divides the
logits by one scalar T fitted to minimise the negative log-likelihood on the
validation split; the top-1 class never changes, only how sure the model says it is.
The fitted T is stored in the model artifact, and ``label`` and ``evaluate`` apply it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ECE_BINS = 15  # the usual choice since Guo et al.; equal-width bins of top-1 confidence
_BETA_RANGE = (1e-2, 1e2)  # 1/T searched over four decades


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, loss=None) -> float:
    """The T > 0 that minimises the NLL of ``labels`` (1.0 for an empty set).

    The NLL is convex in beta = 1/T (a log-sum-exp minus a linear term), so a
    golden-section search over log beta finds its minimum to float precision,
    with no step size to tune and the same answer on every run. (The binary
    cross-entropy of a multi-label model is convex in beta too: a sum of
    log(1 + e^(beta z)) - t beta z.)

    ``loss(logits, labels, T)`` defaults to the softmax NLL; a multi-label model's is
    :func:`simpsons_ray.model.multilabel.binary_nll` (labels are then its 0/1 targets).
    """
    if len(labels) == 0:
        return 1.0
    loss = loss or nll
    labels = np.asarray(labels, dtype=np.int64) if loss is nll else np.asarray(labels)
    lo, hi = np.log(_BETA_RANGE[0]), np.log(_BETA_RANGE[1])
    golden = (np.sqrt(5) - 1) / 2
    f = lambda log_beta: loss(logits, labels, float(np.exp(-log_beta)))  # noqa: E731
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(80):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = f(b)
    return float(np.exp(-(lo + hi) / 2))


@dataclass(frozen=True)
class Reliability:
    """Top-1 confidence against accuracy in equal-width bins; empty bins have count 0."""

    edges: np.ndarray  # ECE_BINS + 1 bin edges over [0, 1]
    confidence: np.ndarray  # mean top-1 confidence per bin
    accuracy: np.ndarray  # share of correct top-1 per bin
    count: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean |accuracy - confidence|."""
        total = self.count.sum()
        return float((self.count * np.abs(self.accuracy - self.confidence)).sum() / total) if total else 0.0


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(axis=1) == np.asarray(labels)) if len(probs) else np.zeros(0, dtype=bool)
    return binned(confidence, correct, bins)


def binned(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> Reliability:
    """Mean confidence against the share correct, in equal-width bins of confidence."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds (edges[i], edges[i+1]]; a confidence of exactly 0 (a saturated sigmoid) joins the first.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, np.bincount(which, weights=confidence, minlength=bins) / count, 0.0)
        mean_acc = np.where(count > 0, np.bincount(which, weights=correct.astype(np.float64), minlength=bins) / count, 0.0)
    return Reliability(edges, mean_conf, mean_acc, count)


def summary(logits: np.ndarray, labels: np.ndarray, temperature: float, probabilities=None, loss=None, curve=None) -> dict[str, float]:
    """ECE and NLL before (T = 1) and after temperature scaling: a softmax's by default.

    A multi-label model passes its own ``probabilities`` (sigmoid), ``loss`` (binary
    NLL) and reliability ``curve`` (over every frame and character).
    """
    probabilities, loss, curve = probabilities or softmax, loss or nll, curve or reliability
    return {
        "temperature": temperature,
        "ece_before": curve(probabilities(logits), labels).ece,
        "ece_after": curve(probabilities(logits, temperature), labels).ece,
        "nll_before": loss(logits, labels),
        "nll_after": loss(logits, labels, temperature),
        "num_images": int(len(labels)),
    }
