"""Free-text query encoders: a sentence in, the query features a dataset stores out (docs/text.md).

Two kinds, one per feature layout:

    roberta   the MS-SL layout (roberta_<collection>_query_feat.hdf5): token rows of hidden
              layer `layer` (-2) of a RoBERTa model, <s> and </s> removed, at most
              `max_tokens` (30) rows, raw (not normalised), float32, (tokens, D)
    clip      the CLIP layout (clip_ViT_B_32_<collection>_query_feat.hdf5): the projected text
              embedding of CLIP's text tower (what OpenAI's encode_text returns), raw, (1, D)

The stored files are raw in both layouts; the readers normalise them on the way in
(prvr.data.datasets), and a query encoded here goes through that same step. Which kind a
dataset needs, and which model its features came from, are facts in params.yaml
(search.datasets.<ds>.encoder), a section neither training nor its fingerprint reads.

Weights come from a local folder (transformers' save_pretrained layout: config.json, the
tokenizer files, model.safetensors), or from a hub name where the machine reaches a hub.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..search.index import SearchError

KINDS = ("roberta", "clip")
# config.model_type values each kind accepts (a full CLIP checkpoint, or its text tower alone)
_MODEL_TYPES = {"roberta": ("roberta",), "clip": ("clip", "clip_text_model")}
# the layout's default kind when a dataset names none
_KIND_OF_FORMAT = {"bigfile": "roberta", "bigfile_hdf5": "roberta", "hdf5": "clip"}


class EncoderError(SearchError):
    """An encoder that cannot be used; one line saying what to download and where to put it."""


@dataclass(frozen=True)
class EncoderSpec:
    kind: str                 # roberta | clip
    dim: int                  # width of the stored query features (datasets.<ds>.text_dim)
    hub: str | None = None    # the model the stored features came from (None: none, e.g. the demo)
    layer: int = -2           # roberta: hidden layer whose token rows are stored
    max_tokens: int = 30      # roberta: real tokens kept; clip: CLIP's 77-token context
    dataset: str = ""

    def download_hint(self) -> str:
        if self.hub is None:
            return (f"dataset {self.dataset}'s stored query features came from no real encoder; any {self.kind} "
                    f"model of width {self.dim} stands in (`prvr tiny-encoder --dataset {self.dataset} --out DIR` "
                    "makes one)")
        return (f"download {self.hub} (`huggingface-cli download {self.hub} --local-dir DIR` on a machine that "
                "reaches the Hugging Face hub) and pass that folder as --encoder DIR")


def encoder_spec(settings: Mapping[str, Any], facts: Mapping[str, Any] | None, dataset: str = "") -> EncoderSpec:
    """The encoder dataset `dataset` needs: `facts` is search.datasets.<ds> (its `encoder`
    entry), `settings` the resolved settings (text_dim, feature_format)."""
    enc = dict((facts or {}).get("encoder") or {})
    fmt = settings.get("feature_format", "bigfile")
    kind = enc.get("kind", _KIND_OF_FORMAT.get(fmt, "roberta"))
    if kind not in KINDS:
        raise EncoderError(f"search.datasets.{dataset}.encoder.kind {kind!r}: expected one of {', '.join(KINDS)}")
    return EncoderSpec(kind=kind, dim=int(settings["text_dim"]), hub=enc.get("hub"),
                       layer=int(enc.get("layer", -2)), max_tokens=int(enc.get("max_tokens", 30 if kind == "roberta" else 77)),
                       dataset=dataset)


class TextEncoder:
    """A tokenizer and a text model, producing a dataset's stored query features for sentences."""

    def __init__(self, tokenizer, model, spec: EncoderSpec, source: str, device: str = "cpu"):
        self.tokenizer, self.model, self.spec, self.source = tokenizer, model, spec, source
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Per sentence its features as the dataset stores them: (tokens, D) or (1, D) float32."""
        texts = list(texts)
        if not texts:
            return []
        if self.spec.kind == "roberta":
            # max_tokens real tokens plus <s> and </s>
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.spec.max_tokens + 2,
                                 return_tensors="pt").to(self.device)
            hidden = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                output_hidden_states=True).hidden_states[self.spec.layer].float()   # (B, L, D)
            n = enc["attention_mask"].sum(1).tolist()                                            # incl. specials
            return [hidden[i, 1:n[i] - 1].cpu().numpy() for i in range(len(texts))]   # <s> .. </s> dropped
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.spec.max_tokens,
                             return_tensors="pt").to(self.device)
        out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).text_embeds.float()
        return [out[i:i + 1].cpu().numpy() for i in range(len(texts))]                          # (1, D) each


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def load_encoder(source: str | os.PathLike, spec: EncoderSpec, device: str = "cpu") -> TextEncoder:
    """The encoder at `source` (a local folder, or a hub name), checked against `spec`: its kind
    and its output width must be the stored features'. Every failure is one EncoderError line."""
    try:
        import transformers
    except ImportError:
        raise EncoderError("free-text queries need transformers: pip install -e \".[text]\"") from None
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    name = str(source)
    path = Path(name).expanduser()
    local = path.is_dir()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.exists() or name.count("/") > 1
    if not local and looks_local:
        what = "not a folder" if path.exists() else "no such folder"
        raise EncoderError(f"encoder {name}: {what}; {spec.download_hint()}")
    where = str(path) if local else name
    try:
        config = transformers.AutoConfig.from_pretrained(where, local_files_only=local)
    except (OSError, ValueError, KeyError) as exc:
        raise EncoderError(f"encoder {name}: no model config there ({_first_line(exc)}); {spec.download_hint()}") from None
    if config.model_type not in _MODEL_TYPES[spec.kind]:
        raise EncoderError(f"encoder {name}: a {config.model_type} model, but dataset {spec.dataset} stores "
                           f"{spec.kind} query features; {spec.download_hint()}")
    width = config.hidden_size if spec.kind == "roberta" else config.projection_dim
    if width != spec.dim:
        raise EncoderError(f"encoder {name}: gives {width}-d features, dataset {spec.dataset} stores {spec.dim}-d; "
                           f"{spec.download_hint()}")
    if spec.kind == "roberta" and not -config.num_hidden_layers - 1 <= spec.layer <= config.num_hidden_layers:
        raise EncoderError(f"encoder {name}: has {config.num_hidden_layers} layers, layer {spec.layer} asked for")
    try:
        if spec.kind == "roberta":
            model = transformers.RobertaModel.from_pretrained(where, local_files_only=local, add_pooling_layer=False)
        else:
            model = transformers.CLIPTextModelWithProjection.from_pretrained(where, local_files_only=local)
        tokenizer = transformers.AutoTokenizer.from_pretrained(where, local_files_only=local)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise EncoderError(f"encoder {name}: cannot load its weights or tokenizer ({_first_line(exc)}); "
                           f"{spec.download_hint()}") from None
    if tokenizer.pad_token is None:
        raise EncoderError(f"encoder {name}: its tokenizer has no pad token")
    return TextEncoder(tokenizer, model.eval().to(device), spec, name, device)
