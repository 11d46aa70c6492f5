"""The token-level query branch (prvr.methods.gmmformer_v2.token_queries) on the packed CPU
modules. Every query slot stays a token (keys masked to the real ones), because RAL's support
set reads the encodings at padded positions too; the branch is small next to the video streams,
whose packed encoders (real frames only) are where the speed is."""
from __future__ import annotations

from torch import Tensor, nn

from ...methods.gmmformer_v2.token_queries import TokenQueryBranch
from .holmes import SlotTokens
from .kernels import as_bool


class PackedTokenQueryBranch(TokenQueryBranch):
    def forward(self, query_feats: Tensor, query_mask: Tensor, pos: nn.Module) -> Tensor:
        """(Nq, L, Dt), (Nq, L) -> (Nq, L, H) every slot's encoding, as the reference."""
        Nq, L = query_mask.shape
        tokens = SlotTokens(as_bool(query_mask), Nq, L, query_feats.device)
        x = self.proj(query_feats.reshape(Nq * L, -1))
        x = pos(x, tokens.positions)
        return self.layer(x, tokens).view(Nq, L, -1)


TABLE = {TokenQueryBranch: PackedTokenQueryBranch}
