"""How far an encoder's output is from a dataset's stored query features (`prvr check-encoder`).

A sample of the split's captions is encoded and compared with the stored features of the same
caption ids:
- per token: the cosine of row i of ours with row i of the stored (over the rows both have);
- per caption: the cosine of the mean row of ours with the mean row of the stored (for the CLIP
  layout, one row: the embedding itself);
- how often the token counts agree (a different tokenizer or truncation shows here first).
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm


def _summary(x: torch.Tensor) -> dict[str, float]:
    x = x.double()
    return {"mean": float(x.mean()), "p10": float(torch.quantile(x, 0.1)), "min": float(x.min()),
            "max": float(x.max())}


def _pad(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), n, rows[0].shape[1])
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = torch.from_numpy(np.asarray(r, dtype=np.float32))
        mask[i, :r.shape[0]] = True
    return out, mask


def check_encoder(corpus, encoder, split: str = "test", n: int = 200, batch: int = 32,
                  progress: bool = True) -> dict[str, Any]:
    """The comparison report of `encoder` on `n` captions of `split` (evenly spaced over it)."""
    t0 = time.perf_counter()
    from ..data.layout import DataError, read_captions

    caps = read_captions(corpus.paths.caption_file(split))
    if not caps:
        raise DataError(f"{corpus.paths.caption_file(split)}: no captions")
    pick = np.unique(np.linspace(0, len(caps) - 1, min(n, len(caps))).round().astype(int)) if n else np.arange(len(caps))
    ids = [caps[i][0] for i in pick]
    texts = [caps[i][2] for i in pick]
    ours: list[np.ndarray] = []
    for lo in tqdm(range(0, len(texts), batch), desc="encode captions", unit="batch", disable=not progress,
                   dynamic_ncols=True):
        ours += encoder.encode(texts[lo:lo + batch])
    stored = [np.asarray(corpus.text.get(q), dtype=np.float32).reshape(-1, encoder.spec.dim) for q in ids]
    a, am = _pad(ours)
    b, bm = _pad(stored)
    L = min(a.shape[1], b.shape[1])
    both = am[:, :L] & bm[:, :L]                                                          # (N, L)
    tok = torch.nn.functional.cosine_similarity(a[:, :L], b[:, :L], dim=-1, eps=1e-8)[both]
    mean_a = (a * am[..., None]).sum(1) / am.sum(1, keepdim=True).clamp(min=1)
    mean_b = (b * bm[..., None]).sum(1) / bm.sum(1, keepdim=True).clamp(min=1)
    cap = torch.nn.functional.cosine_similarity(mean_a, mean_b, dim=-1, eps=1e-8)
    n_ours, n_stored = am.sum(1), bm.sum(1)
    worst = torch.argsort(cap)[:5].tolist()
    return {
        "dataset": encoder.spec.dataset, "split": split, "encoder": encoder.source, "kind": encoder.spec.kind,
        "layer": encoder.spec.layer if encoder.spec.kind == "roberta" else None,
        "captions": len(ids), "dim": encoder.spec.dim,
        "token_counts_equal": float((n_ours == n_stored).double().mean()),
        "tokens_ours_mean": float(n_ours.double().mean()), "tokens_stored_mean": float(n_stored.double().mean()),
        "per_token_cosine": _summary(tok) | {"rows": int(tok.numel())},
        "per_caption_cosine": _summary(cap),
        "worst_captions": [{"caption_id": ids[i], "text": texts[i], "cosine": float(cap[i]),
                            "tokens_ours": int(n_ours[i]), "tokens_stored": int(n_stored[i])} for i in worst],
        "seconds": time.perf_counter() - t0,
    }


def readable(report: dict[str, Any]) -> str:
    t, c = report["per_token_cosine"], report["per_caption_cosine"]
    lines = [f"check-encoder: {report['encoder']} ({report['kind']}) against {report['dataset']}/{report['split']}'s "
             f"stored query features, {report['captions']} captions, {report['dim']}-d",
             f"  token counts equal: {100 * report['token_counts_equal']:.1f}% (ours {report['tokens_ours_mean']:.1f}, "
             f"stored {report['tokens_stored_mean']:.1f} a caption)",
             f"  per-token cosine:   mean {t['mean']:.4f}  p10 {t['p10']:.4f}  min {t['min']:.4f}  ({t['rows']} rows)",
             f"  per-caption cosine: mean {c['mean']:.4f}  p10 {c['p10']:.4f}  min {c['min']:.4f}",
             "  lowest captions:"]
    lines += [f"    {w['cosine']:+.4f}  {w['caption_id']}  ({w['tokens_ours']} vs {w['tokens_stored']} tokens)  "
              f"{w['text'][:70]}" for w in report["worst_captions"]]
    return "\n".join(lines)
