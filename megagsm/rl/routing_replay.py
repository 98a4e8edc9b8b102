"""MoE routing replay for GSPO (``algorithm.gspo.routing_replay``) and the routing-drift metrics.

- ``r3``: the rollout's routing (recorded by the generation engine, megagsm.generation.routing) is
  replayed in the old-log-prob pass and in every update forward (and its recompute in the backward),
  so the trainer scores each sampled token through the experts that produced it;
- ``r2``: the old-log-prob pass routes by itself and its choice is replayed in the update, so the
  policy ratio compares the same experts (the rollout's routing is still recorded, for the metrics);
- ``none``: nothing is recorded or replayed.

Layouts. A microbatch's ``routing`` is ``[b, T, layers, k]`` (row i, position t: the rollout's choice
for token t of that row; positions past the sequence hold experts 0..k-1, never scored); a packed
microbatch (megagsm.rl.packing) is one such row holding its sequences' routing back to back. The router
sees the [T, b] activations flattened sequence-major, and under sequence parallelism only its TP
rank's chunk of T (``router_order``). ``old_routing`` (r2) is kept in the router's own order,
``[layers, tokens, k]``: it is replayed on the very rank and microbatch that recorded it.

Metrics (old-log-prob pass, per step, over every rank's tokens and layers; only real tokens count):
``router_match_rate`` is the fraction of (token, layer) top-k sets the old-log-prob pass routed with
that equal the rollout's (1.0 under r3), ``router_natural_match_rate`` what its routers would have
chosen by themselves against the rollout's (the drift, visible with replay on), and
``routing_replay_bytes`` what the recorded indices take (summed over ranks).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megagsm.generation.routing import routing_bytes
from megagsm.models.gpt import unwrap_model
from megagsm.models.router_replay import ModelRouting
from megagsm.runtime.collectives import group_size, reduce_numbers, tp_group, tp_rank

REPLAY_MODES = ("none", "r2", "r3")


def filler_routing(T: int, layers: int, topk: int, dtype: torch.dtype) -> torch.Tensor:
    """[T, layers, k] routing of positions no loss reads: experts 0..k-1 (distinct, always valid)."""
    return torch.arange(topk, dtype=dtype).expand(T, layers, topk).clone()


def real_positions(response_mask: torch.Tensor) -> torch.Tensor:
    """[b, T] bool: the positions of a row's tokens (0 .. its last scored position), not padding."""
    scored = response_mask > 0
    return scored.flip(-1).cummax(-1).values.flip(-1)


def token_positions(batch: dict) -> torch.Tensor:
    """[b, T] bool: a microbatch's sequence tokens (a packed one says so in ``token_mask``; padded
    rows hold them up to their last scored position)."""
    return batch["token_mask"] if "token_mask" in batch else real_positions(batch["response_mask"])


def _local_positions(values: torch.Tensor, config) -> torch.Tensor:
    """[T, b, ...] -> this rank's [T_local * b, ...] in the router's order."""
    if config.sequence_parallel and tp_group() is not None:
        chunk = values.shape[0] // group_size(tp_group())
        values = values[tp_rank() * chunk: (tp_rank() + 1) * chunk]
    return values.reshape(-1, *values.shape[2:])


def router_order(routing: torch.Tensor, config) -> torch.Tensor:
    """[b, T, layers, k] -> [tokens, layers, k], the tokens as this rank's routers see them."""
    return _local_positions(routing.transpose(0, 1), config)


def _same_sets(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[tokens, layers] bool: equal top-k sets (order inside a set does not matter)."""
    return (a.sort(-1).values == b.long().sort(-1).values).all(-1)


@dataclass
class RoutingPass:
    """How one schedule call routes, and what it keeps. ``replay_key``: the microbatch key to replay
    (``routing``: the rollout's, ``old_routing``: r2's), None to route naturally; ``keep_chosen``:
    keep each microbatch's choice (r2's old pass); ``count_matches``: the drift metrics."""

    routing: ModelRouting
    replay_key: str | None = None
    keep_chosen: bool = False
    count_matches: bool = False
    backward: bool = False              # a training pass: keep replayed indices for a recompute
    kept: list = field(default_factory=list)
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))

    def before_forward(self, batch: dict, model) -> None:
        config = unwrap_model(model).config
        if self.replay_key is None:
            self.routing.record()
            return
        if self.replay_key == "old_routing":
            per_layer = list(batch["old_routing"])
        else:
            per_layer = list(router_order(batch["routing"], config).transpose(0, 1))
        self.routing.replay(per_layer, keep_for_recompute=self.backward and self.routing.recomputes)

    def after_forward(self, batch: dict, model) -> None:
        if not (self.keep_chosen or self.count_matches):
            return
        chosen = self.routing.chosen()
        if self.keep_chosen:
            self.kept.append(chosen.transpose(0, 1).to(self.routing.dtype))
        if self.count_matches and "routing" in batch:
            config = unwrap_model(model).config
            rollout = router_order(batch["routing"], config).to(chosen.device)
            real = _local_positions(token_positions(batch).transpose(0, 1), config)
            real = real.to(chosen.device).unsqueeze(-1)
            counts = torch.stack([(_same_sets(chosen, rollout) & real).sum(),
                                  (_same_sets(self.routing.natural(), rollout) & real).sum(),
                                  real.sum() * self.routing.num_layers])
            self.sums = self.sums + counts.double().cpu()

    def finish(self) -> None:
        self.routing.stop()


def routing_metrics(sums: torch.Tensor, routing: list[torch.Tensor] | None) -> dict[str, float]:
    """Collective over all ranks: the match rates of the counts and the recorded routing's bytes."""
    chosen, natural, total, nbytes = reduce_numbers([*sums.tolist(), routing_bytes(routing)], "sum")
    out = {"routing_replay_bytes": nbytes}
    if total > 0:
        out.update(router_match_rate=chosen / total, router_natural_match_rate=natural / total)
    return out
