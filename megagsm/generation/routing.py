"""Per-sequence MoE routing of a generation: what every MoE layer chose for every token fed to it.

A sequence's routing is ``[L + R - 1, layers, k]``: its L prompt tokens (prefill), then response tokens
0..R-2 (decode step s feeds the token sampled at step s; the last sampled token is never fed). That
is exactly the training row's token order (``tokens = seq[:-1]``, megagsm.rl.batching), so position t
of a training row is routed like position t of the rollout.

The router sees a forward's [s, b] tokens flattened sequence-major: a prefill chunk of `rows` prompts
(left- or right-padded to L) gives [L * rows, k], a decode step [b, k] (row r: the sequence in cache
row r). Expert-parallel dummy forwards are not recorded.
"""
from __future__ import annotations

import torch


class RoutingRecorder:
    def __init__(self, routing, num_prompts: int, n: int, max_new_tokens: int):
        self.routing, self.n = routing, n
        self.prompt_parts: list[torch.Tensor | None] = [None] * num_prompts
        shape = (num_prompts * n, max(max_new_tokens - 1, 0), routing.num_layers, routing.topk)
        self.decode_part = torch.zeros(shape, dtype=routing.dtype)

    def start(self) -> None:
        self.routing.record()

    def stop(self) -> None:
        self.routing.stop()

    def prefill(self, prompt_ids, lens, padding_side: str, L: int) -> None:
        """After the prefill forward of prompts `prompt_ids` ([len(prompt_ids), L], padded on
        `padding_side`; lens: their lengths)."""
        chosen = self.routing.chosen().view(L, len(prompt_ids), self.routing.num_layers, self.routing.topk)
        chosen = chosen.to(device="cpu", dtype=self.routing.dtype)
        for row, i in enumerate(prompt_ids):
            n = int(lens[row])
            cols = slice(L - n, L) if padding_side == "left" else slice(0, n)
            self.prompt_parts[i] = chosen[cols, row].clone()

    def decode(self, step, seq_ids: torch.Tensor) -> None:
        """After the decode forward feeding response token `step` (one for all rows, or [b] per row) of
        the sequences seq_ids (by cache row; a forward over more rows, static shapes, has them first)."""
        chosen = self.routing.chosen().to(device="cpu", dtype=self.routing.dtype)
        chosen = chosen.view(-1, self.routing.num_layers, self.routing.topk)[: len(seq_ids)]
        self.decode_part[seq_ids, step] = chosen

    def per_sequence(self, lengths: torch.Tensor) -> list[torch.Tensor]:
        """[L + R - 1, layers, k] for every sequence j (prompt j // n, response length lengths[j])."""
        return [torch.cat([self.prompt_parts[j // self.n], self.decode_part[j, : max(int(r) - 1, 0)]])
                for j, r in enumerate(lengths)]


def routing_bytes(routing: list[torch.Tensor] | None) -> int:
    return 0 if routing is None else sum(t.numel() * t.element_size() for t in routing)
