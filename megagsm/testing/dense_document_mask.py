"""The dense per-document mask packed SFT rows were attended with before they went in as THD
documents (megagsm.sft.data.packed_microbatch): the reference the THD path is tested against.
O(S^2) memory per row, and transformer-engine ignores it under a causal mask type, hence THD."""
from __future__ import annotations

import torch


def packed_attention_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``[B, 1, S, S]`` mask, True where attention is NOT allowed (megatron's convention).

    A query attends to keys at or before it in the same document. Padding tokens (-1) attend to the
    padding before them, so no row is fully masked (a fully masked softmax row gives NaN).
    """
    if document_ids.dim() == 1:
        document_ids = document_ids.unsqueeze(0)
    seq = document_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids.unsqueeze(-1) == document_ids.unsqueeze(-2)
    return ~(causal & same_doc).unsqueeze(1)


def dense_mask_microbatch(rows: list[dict]) -> dict:
    """Packed rows -> the [B, S] microbatch of the dense-mask path (the rows as they are, positions
    restarting per document, this mask), as megagsm.sft.data built it before THD."""
    stacked = {k: torch.stack([r[k] for r in rows])
               for k in ("input_ids", "labels", "loss_mask", "position_ids", "document_ids")}
    return {"tokens": stacked["input_ids"], "labels": stacked["labels"], "loss_mask": stacked["loss_mask"],
            "position_ids": stacked["position_ids"], "attention_mask": packed_attention_mask(stacked["document_ids"])}
