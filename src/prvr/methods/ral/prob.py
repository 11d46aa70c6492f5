"""RAL's probabilistic embeddings and their two losses (docs/ral.md, "Multimodal semantic robust
alignment"): training only, never in a score.

A video and the support set of its queries each become a Gaussian: its mean is a polysemous
instance embedding (PIE: attention pooling over the sequence, sigmoid(Linear), added to a
pooled vector, LayerNorm, L2-normalised), its log sigma an uncertainty head (attention pooling
-> Linear, plus Linear of the pooled vector). `n_samples` embeddings are drawn from each.

The attention pooling runs, as the release's does, over padded sequences without a mask: the
video's 128 frame slots (zero rows past its frames), and the support set of Lq x support_slots
rows (every token position of each query of the video, padding positions included, then zero
rows). A zero row has attention logit 0 (the two Linears have no bias) and adds nothing but its
exp(0) to the softmax's denominator, so here such rows are counted, not materialised.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AttentionPool(nn.Module):
    """One-head additive attention pooling: softmax over rows of w_2 tanh(w_1 x), then the
    weighted sum of the rows."""

    def __init__(self, d_in: int, d_hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(d_in, d_hidden, bias=False)
        self.w_2 = nn.Linear(d_hidden, 1, bias=False)

    def forward(self, x: Tensor, valid: Tensor, zero_rows: Tensor) -> Tensor:
        """x (B, S, H), valid (B, S) bool (rows that take part), zero_rows (B,) how many further
        all-zero rows the softmax counts -> (B, H)"""
        logits = self.w_2(torch.tanh(self.w_1(x))).squeeze(-1).masked_fill(~valid, float("-inf"))
        top = logits.amax(1)
        top = torch.where(zero_rows > 0, top.clamp_min(0.0), top)
        e = torch.exp(logits - top[:, None])
        denom = e.sum(1) + zero_rows.to(e.dtype) * torch.exp(-top)
        return torch.einsum("bs,bsh->bh", e / denom[:, None], x)


class GaussianEmbedding(nn.Module):
    """The PIE mean and the uncertainty head of one modality: (pooled, sequence) -> (mean, logsigma)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.pie_attention = AttentionPool(hidden, hidden // 2)
        self.pie_fc = nn.Linear(hidden, hidden)
        self.pie_norm = nn.LayerNorm(hidden)
        self.sigma_attention = AttentionPool(hidden, hidden // 2)
        self.sigma_fc = nn.Linear(hidden, hidden)
        self.sigma_fc_pooled = nn.Linear(hidden, hidden)

    def forward(self, pooled: Tensor, x: Tensor, valid: Tensor, zero_rows: Tensor) -> tuple[Tensor, Tensor]:
        """pooled (B, H), x (B, S, H) -> mean (B, H) unit norm, logsigma (B, H)"""
        residual = torch.sigmoid(self.pie_fc(self.pie_attention(x, valid, zero_rows)))
        mean = F.normalize(self.pie_norm(pooled + residual), dim=-1)
        logsigma = self.sigma_fc(self.sigma_attention(x, valid, zero_rows)) + self.sigma_fc_pooled(pooled)
        return mean, logsigma


def release_groups(ours: str, rel_pie: str, rel_sigma: str) -> list[tuple[str, list[str]]]:
    """(our name, [release name]) of one GaussianEmbedding: the release's PIENet and
    UncertaintyModuleImage."""
    out = [(f"{ours}.pie_attention.w_1.weight", [f"{rel_pie}.attention.w_1.weight"]),
           (f"{ours}.pie_attention.w_2.weight", [f"{rel_pie}.attention.w_2.weight"])]
    for kind in ("weight", "bias"):
        out += [(f"{ours}.pie_fc.{kind}", [f"{rel_pie}.fc.{kind}"]),
                (f"{ours}.pie_norm.{kind}", [f"{rel_pie}.layer_norm.{kind}"])]
    out += [(f"{ours}.sigma_attention.w_1.weight", [f"{rel_sigma}.attention.w_1.weight"]),
            (f"{ours}.sigma_attention.w_2.weight", [f"{rel_sigma}.attention.w_2.weight"])]
    for kind in ("weight", "bias"):
        out += [(f"{ours}.sigma_fc.{kind}", [f"{rel_sigma}.fc.{kind}"]),
                (f"{ours}.sigma_fc_pooled.{kind}", [f"{rel_sigma}.fc2.{kind}"])]
    return out


def release_layout(rel_pie: str, rel_sigma: str, H: int) -> list[tuple[str, tuple[int, ...]]]:
    """The release names and shapes of one modality's PIENet and UncertaintyModuleImage."""
    h = H // 2
    return [(f"{rel_pie}.attention.w_1.weight", (h, H)), (f"{rel_pie}.attention.w_2.weight", (1, h)),
            (f"{rel_pie}.fc.weight", (H, H)), (f"{rel_pie}.fc.bias", (H,)),
            (f"{rel_pie}.layer_norm.weight", (H,)), (f"{rel_pie}.layer_norm.bias", (H,)),
            (f"{rel_sigma}.attention.w_1.weight", (h, H)), (f"{rel_sigma}.attention.w_2.weight", (1, h)),
            (f"{rel_sigma}.fc.weight", (H, H)), (f"{rel_sigma}.fc.bias", (H,)),
            (f"{rel_sigma}.fc2.weight", (H, H)), (f"{rel_sigma}.fc2.bias", (H,))]


def support_sets(tokens: Tensor, token_mask: Tensor, labels: Tensor, n_videos: int
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Each video's queries' token rows, concatenated in query order.

    tokens (Nq, L, H), token_mask (Nq, L) bool, labels (Nq,) video index -> rows (B, Qmax * L, H)
    (zero past the video's queries), rows_valid (B, Qmax * L) bool (the rows of its queries,
    every position), rows_real (B, Qmax * L) bool (their real tokens)."""
    n_q, L, H = tokens.shape
    labels = labels.to(tokens.device).long()
    order = torch.sort(labels, stable=True).indices
    counts = torch.bincount(labels, minlength=n_videos)
    first = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(labels)
    slot[order] = torch.arange(n_q, device=labels.device) - first[labels[order]]
    q_max = int(counts.max()) if n_q else 0
    rows = tokens.new_zeros(n_videos, q_max, L, H)
    rows[labels, slot] = tokens
    valid = torch.zeros(n_videos, q_max, L, dtype=torch.bool, device=tokens.device)
    valid[labels, slot] = True
    real = torch.zeros_like(valid)
    real[labels, slot] = token_mask
    return rows.view(n_videos, q_max * L, H), valid.view(n_videos, -1), real.view(n_videos, -1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(B, S, H), (B, S) bool -> (B, H) the mean over the True rows."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1)


def sample(mean: Tensor, logsigma: Tensor, noise: Tensor) -> Tensor:
    """(B, H), (B, H), noise (B, K, H) standard normal -> (B, K, H) = mean + noise * sigma."""
    return mean.unsqueeze(1) + noise * torch.exp(logsigma).unsqueeze(1)


def proxy_matching_loss(video_samples: Tensor, text_samples: Tensor) -> Tensor:
    """RAL's L_PM (the release's MIL-NCE over bags of samples), both directions averaged: the
    (B K) x (B K) dot products of all samples; each sample's positives are the K samples of the
    other modality of its own video; -mean over positives of the row's log-softmax, mean over
    rows."""
    B, K, H = video_samples.shape

    def one_way(a: Tensor, b: Tensor) -> Tensor:
        sim = a.reshape(B * K, H) @ b.reshape(B * K, H).t()
        logp = F.log_softmax(sim, dim=1).view(B * K, B, K)
        own = torch.arange(B * K, device=sim.device) // K
        return -(logp[torch.arange(B * K, device=sim.device), own].sum(-1) / K).mean()

    return (one_way(video_samples, text_samples) + one_way(text_samples, video_samples)) / 2


def distribution_alignment_loss(video_samples: Tensor, video_logsigma: Tensor, text_samples: Tensor,
                                text_logsigma: Tensor) -> Tensor:
    """RAL's L_DA (the release's KLdivergence): the KL of each modality's Gaussian (mean = the
    samples' mean) to N(0, I), plus the release's cross-modal term, each summed over the hidden
    size and averaged over the videos. The cross term is the release's formula as written:
    log sigma_v - log sigma_t + (var_t^2 + (mu_t - mu_v)^2) / (2 var_v^2) - 1/2, var = exp(log sigma)."""
    def prior_kl(mu: Tensor, logsigma: Tensor) -> Tensor:
        return (-0.5 * (1 + logsigma - mu.pow(2) - logsigma.exp())).sum(1).mean()

    mu_v, mu_t = video_samples.mean(1), text_samples.mean(1)
    var_v, var_t = video_logsigma.exp(), text_logsigma.exp()
    cross = video_logsigma - text_logsigma + (var_t.pow(2) + (mu_t - mu_v).pow(2)) / (2 * var_v.pow(2)) - 0.5
    return prior_kl(mu_v, video_logsigma) + prior_kl(mu_t, text_logsigma) + cross.sum(1).mean()


__all__ = ["AttentionPool", "GaussianEmbedding", "support_sets", "masked_mean", "sample",
           "proxy_matching_loss", "distribution_alignment_loss", "release_groups", "release_layout"]
