"""Holmes' evidential pieces (docs/holmes.md), batched, in fp32.

A row of scores s (one query against B videos, or against a video's C clips) is read as
Dirichlet evidence e = exp(tanh(s) / tau), alpha = e + 1, strength S = sum(alpha), uncertainty
u = K / S over the row's K classes. The loss of a row against a target distribution y is the
expected squared error under the Dirichlet,

    sum_k (y_k - alpha_k / S)^2 + sum_k alpha_k (S - alpha_k) / (S^2 (S + 1)).

Temperatures are small (0.04-0.08), so evidence reaches exp(25): every function here computes in
fp32 with autocast off, whatever the dtype of its inputs.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor


def fp32(x: Tensor) -> tuple[Tensor, contextlib.AbstractContextManager]:
    """(x as float32, a context with autocast off on x's device)."""
    return x.float(), torch.autocast(x.device.type, enabled=False)


def evidence(scores: Tensor, tau: float) -> Tensor:
    """exp(tanh(scores) / tau), fp32."""
    s, no_autocast = fp32(scores)
    with no_autocast:
        return torch.exp(torch.tanh(s) / tau)


def dirichlet_mse(alpha: Tensor, target: Tensor) -> Tensor:
    """The expected squared error of each row (last dim = classes): alpha (..., K), target
    (..., K) -> (...)."""
    alpha, no_autocast = fp32(alpha)
    with no_autocast:
        strength = alpha.sum(-1, keepdim=True)
        err = (target.float() - alpha / strength).pow(2).sum(-1)
        var = (alpha * (strength - alpha) / (strength * strength * (strength + 1))).sum(-1)
        return err + var


def ds_combine(alpha1: Tensor, alpha2: Tensor) -> Tensor:
    """Dempster-Shafer combination of two Dirichlet opinions per row (K classes each): the
    evidence of the combined opinion, (N, K).

    belief b = (alpha - 1) / S, uncertainty u = K / S; conflict C = sum_{i != j} b1_i b2_j;
    b = (b1 b2 + b1 u2 + b2 u1) / (1 - C), u = u1 u2 / (1 - C), evidence = b * K / u.
    """
    a1, no_autocast = fp32(alpha1)
    with no_autocast:
        a2 = alpha2.float()
        K = a1.shape[-1]
        s1, s2 = a1.sum(-1, keepdim=True), a2.sum(-1, keepdim=True)
        b1, b2 = (a1 - 1) / s1, (a2 - 1) / s2
        u1, u2 = K / s1, K / s2
        conflict = b1.sum(-1, keepdim=True) * b2.sum(-1, keepdim=True) - (b1 * b2).sum(-1, keepdim=True)
        b = (b1 * b2 + b1 * u2 + b2 * u1) / (1 - conflict)
        u = u1 * u2 / (1 - conflict)
        return b * (K / u)


def expected_entropy(alpha: Tensor) -> Tensor:
    """sum_k p_k (digamma(S + 1) - digamma(alpha_k + 1)), p = alpha / S, per row."""
    strength = alpha.sum(-1, keepdim=True)
    return (alpha / strength * (torch.digamma(strength + 1) - torch.digamma(alpha + 1))).sum(-1)


def pair_division(scores: Tensor, labels: Tensor, alpha: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """Holmes' three-fold division of the queries on one view (clip or frame scores (Nq, B)):
    (certain, doubtful) bool masks (Nq,); the rest are the uncertain queries.

    Thresholds come from the queries the view ranks right (argmax = own video): the largest
    uncertainty among them, at most 1 - beta, and the lowest own-video score, at least beta
    (1 - beta and beta when none is right). A query above the uncertainty threshold is
    uncertain; the others with an own-video score below the score threshold are doubtful; of
    the rest, those whose expected entropy is above the median over all queries are doubtful
    too, and the remainder is certain.
    """
    n_v = scores.shape[1]
    right = scores.argmax(1) == labels
    own = scores.gather(1, labels[:, None]).squeeze(1)
    unc = n_v / alpha.sum(1)
    any_right = right.any()
    max_u = torch.where(any_right, unc.masked_fill(~right, float("-inf")).amax(), unc.new_tensor(1.0))
    min_own = torch.where(any_right, own.masked_fill(~right, float("inf")).amin(), own.new_tensor(0.0))
    max_u = max_u.clamp(max=1.0 - beta)
    min_own = min_own.clamp(min=beta)
    sure = unc <= max_u
    entropy = expected_entropy(alpha)
    high = entropy > torch.median(entropy)
    certain = sure & (own >= min_own) & ~high
    doubtful = sure & ((own < min_own) | high)
    return certain, doubtful


def smoothed_targets(frame: Tensor, clip: Tensor, labels: Tensor, frame_alpha: Tensor, clip_alpha: Tensor,
                     division_beta: float, smooth_beta: float) -> Tensor:
    """The EDL targets after the warm-up, (Nq, B): one-hot, except for the ambiguous queries
    (doubtful on one view and certain or doubtful on the other): (1 - smooth_beta) one-hot +
    smooth_beta / 2 (softmax(frame) + softmax(clip)), the softmaxes detached."""
    frame, no_autocast = fp32(frame)
    with no_autocast:
        clip = clip.float()
        onehot = F.one_hot(labels, frame.shape[1]).float()
        f_certain, f_doubt = pair_division(frame, labels, frame_alpha, division_beta)
        c_certain, c_doubt = pair_division(clip, labels, clip_alpha, division_beta)
        ambiguous = (f_certain & c_doubt) | (f_doubt & c_certain) | (f_doubt & c_doubt)
        keep = (1 - smooth_beta) * onehot
        smooth = 0.5 * ((keep + smooth_beta * torch.softmax(frame.detach(), 1))
                        + (keep + smooth_beta * torch.softmax(clip.detach(), 1)))
        return torch.where(ambiguous[:, None], smooth, onehot)
