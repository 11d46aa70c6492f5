"""Tiny randomly initialised encoders, saved in the same folder layout as real weights.

They stand in where no real weights exist: the tests (no hub is ever reached), and the demo,
whose stored query features came from no encoder (its hits then mean nothing; the path is
what it shows). The tokenizer is a byte-level BPE (RoBERTa) or an end-of-word BPE (CLIP)
trained here with `tokenizers` on the captions given.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

import torch

ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def _roberta_tokenizer(texts: list[str], out: Path, vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, special_tokens=ROBERTA_SPECIALS,
                            show_progress=False)
    bpe.save_model(str(out))   # vocab.json, merges.txt
    tok = RobertaTokenizerFast.from_pretrained(str(out))   # reads them as roberta-base's are read
    tok.save_pretrained(str(out))
    return tok


def _clip_tokenizer(texts: list[str], out: Path, vocab_size: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=CLIP_SPECIALS[1], end_of_word_suffix="</w>"))
    tk.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1,
                                                      special_tokens=CLIP_SPECIALS, end_of_word_suffix="</w>",
                                                      show_progress=False))
    bos, eos = (tk.token_to_id(t) for t in CLIP_SPECIALS)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_SPECIALS[0]} $A {CLIP_SPECIALS[1]}", special_tokens=[(CLIP_SPECIALS[0], bos), (CLIP_SPECIALS[1], eos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=CLIP_SPECIALS[0], eos_token=CLIP_SPECIALS[1],
                                  unk_token=CLIP_SPECIALS[1], pad_token=CLIP_SPECIALS[1], model_max_length=77)
    tok.save_pretrained(str(out))
    return tok


def make_tiny_encoder(out_dir: str | os.PathLike, kind: str, dim: int, texts: Iterable[str], *,
                      layers: int = 2, heads: int = 2, vocab_size: int = 400, seed: int = 0) -> Path:
    """Write a random `kind` (roberta | clip) encoder of output width `dim` to `out_dir`
    (atomically: built in a temporary folder beside it, then renamed)."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    texts = [t for t in texts if t.strip()] or ["a person opens a door"]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    torch.manual_seed(seed)
    if kind == "roberta":
        tok = _roberta_tokenizer(texts, tmp, vocab_size)
        config = transformers.RobertaConfig(
            vocab_size=len(tok), hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=2 * dim, max_position_embeddings=66, pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = transformers.RobertaModel(config, add_pooling_layer=False)
    elif kind == "clip":
        tok = _clip_tokenizer(texts, tmp, vocab_size)
        config = transformers.CLIPTextConfig(
            vocab_size=len(tok), hidden_size=max(dim // 2, 8), intermediate_size=dim, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=77, projection_dim=dim,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = transformers.CLIPTextModelWithProjection(config)
    else:
        raise ValueError(f"kind {kind!r}: expected roberta or clip")
    model.save_pretrained(str(tmp))
    (tmp / "TINY.json").write_text(json.dumps({"kind": kind, "dim": dim, "seed": seed,
                                               "note": "random weights: a stand-in, its results mean nothing"}),
                                   encoding="utf-8")
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir
