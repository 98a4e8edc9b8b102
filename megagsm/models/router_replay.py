"""The MoE routers of this rank's model chunks, driven through megatron's RouterReplay.

megatron-core 0.16.1's TopKRouter routes through ``topk_routing_with_score_function``, which hands the
top-k choice to the router's ``router_replay`` (a ``RouterReplay``) when it has one: RECORD keeps the
indices it chose, REPLAY_FORWARD takes the indices set with ``set_target_indices`` and gathers their
scores, REPLAY_BACKWARD pops them, in the order they were set, for an activation recompute in the
backward pass. ``ModelRouting`` gives every TopKRouter of the model such an object (as
``moe_enable_routing_replay`` would; attaching it after the build needs no model rebuild) and drives
them layer by layer. Two additions, both in ``_MonitoredReplay``:

- while replaying it also keeps what the router would have chosen by itself (its natural top-k, same
  scores, same group limits and expert bias), so routing drift stays measurable with replay on;
- it picks REPLAY_BACKWARD by itself when called from inside the autograd engine (a recompute in the
  backward): megatron leaves switching the action between forward and recompute to the caller.

Indices are in the router's token order: the [s, b] activations flattened sequence-major
(``s_index * b + b_index``), over the local sequence chunk under sequence parallelism.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

from megagsm.models.gpt import unwrap_model

_REPLAYING = (RouterReplayAction.REPLAY_FORWARD, RouterReplayAction.REPLAY_BACKWARD)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class _MonitoredReplay(RouterReplay):
    def __init__(self):
        super().__init__()
        # this process may build several models (tests, converters): each ModelRouting drives its
        # own routers, so megatron's process-wide list must not collect stale ones
        RouterReplay.global_router_replay_instances.remove(self)
        self.natural_topk_idx: torch.Tensor | None = None

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
        if self.router_replay_action in _REPLAYING:
            self.router_replay_action = (RouterReplayAction.REPLAY_BACKWARD if _in_backward()
                                         else RouterReplayAction.REPLAY_FORWARD)
            if self.router_replay_action == RouterReplayAction.REPLAY_FORWARD:
                with torch.no_grad():
                    self.natural_topk_idx = default_compute_topk(scores, topk, num_groups=num_groups,
                                                                 group_topk=group_topk)[1]
        probs, indices = super().get_replay_topk(scores, topk, num_groups, group_topk, default_compute_topk)
        if self.router_replay_action == RouterReplayAction.RECORD:
            self.natural_topk_idx = indices
        return probs, indices

    def clear_indices(self):
        super().clear_indices()
        self.natural_topk_idx = None


def moe_routers(model_chunks: list) -> list[TopKRouter]:
    """This rank's TopKRouters in layer order (dense layers have none)."""
    routers = []
    for chunk in model_chunks:
        for layer in unwrap_model(chunk).decoder.layers:
            router = getattr(getattr(layer, "mlp", None), "router", None)
            if isinstance(router, TopKRouter):
                routers.append(router)
    return routers


class ModelRouting:
    """Record, replay and read the top-k expert choices of every MoE layer on this rank."""

    def __init__(self, model_chunks: list):
        self.routers = moe_routers(model_chunks)
        if not self.routers:
            raise ValueError("the model has no MoE layer with a top-k router")
        config = self.routers[0].config
        self.topk = config.moe_router_topk
        self.num_experts = config.num_moe_experts
        # compact storage for recorded indices: Qwen3-30B-A3B has 128 experts, DeepSeek-V3 256
        self.dtype = torch.uint8 if self.num_experts <= 256 else torch.int16
        self.replays = []
        for router in self.routers:
            if not isinstance(router.router_replay, _MonitoredReplay):
                router.router_replay = _MonitoredReplay()
            self.replays.append(router.router_replay)

    @property
    def num_layers(self) -> int:
        return len(self.replays)

    def record(self) -> None:
        """Route naturally and keep the choice (read it with `chosen`)."""
        for r in self.replays:
            r.clear_indices()
            r.set_router_replay_action(RouterReplayAction.RECORD)

    @property
    def recomputes(self) -> bool:
        """Whether the backward re-runs the routers (activation recompute of whole layers or MoE)."""
        config = self.routers[0].config
        return config.recompute_granularity == "full" or (
            config.recompute_granularity == "selective" and "moe" in (config.recompute_modules or []))

    def replay(self, per_layer: list[torch.Tensor], keep_for_recompute: bool = False) -> None:
        """Route the next forward with these [tokens, k] indices, one tensor per layer. With
        keep_for_recompute they also join megatron's backward queue (consumed in forward order by
        the recomputes in the backward); otherwise only the latest indices are held."""
        if len(per_layer) != self.num_layers:
            raise ValueError(f"{len(per_layer)} routing tensors for {self.num_layers} MoE layers")
        for r, indices in zip(self.replays, per_layer):
            if not keep_for_recompute:
                r.replay_backward_list.clear()
            r.set_target_indices(indices.long())
            r.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)

    def stop(self) -> None:
        """Back to megatron's own routing; drops every recorded or queued index."""
        for r in self.replays:
            r.clear_indices()
            r.clear_router_replay_action()

    def chosen(self) -> torch.Tensor:
        """[tokens, layers, k] indices the last forward routed with (recorded or replayed)."""
        return torch.stack([r.recorded_topk_idx if r.router_replay_action == RouterReplayAction.RECORD
                            else r.target_topk_idx for r in self.replays], dim=1)

    def natural(self) -> torch.Tensor:
        """[tokens, layers, k] indices the last forward's routers would have chosen by themselves."""
        return torch.stack([r.natural_topk_idx for r in self.replays], dim=1)
