"""What `make mutate` mutates and which fast tests cover it (data only: update it when files move).

TARGETS: module -> {"tests": pytest files or node ids that cover it, "functions": optional list of
top-level functions/classes to mutate (default: the whole file), "max_mutants": optional cap below
`--max-mutants` for modules whose tests are slow, "slow": True to run the tests marked slow among
"tests" too (deselected otherwise)}. Paths are relative to the repository root. Keep each module's
tests fast: every mutant runs them once.
"""
from __future__ import annotations

# module -> what to mutate and the fast tests that cover it. `functions` limits mutation to those
# top-level functions / classes (None: the whole file). Paths are relative to the repository root;
# tests are pytest file paths or node ids. This is data: update it when files move.
_GEN = "tests/test_generation.py::"
_FCE = "tests/test_fused_ce.py::"
_TRUTHS = "tests/test_independent_truths.py"
_HF = "tests/test_hf_truths.py"
_BY_HAND = "tests/test_by_hand_boundaries.py"
_DATA_BY_HAND = "tests/test_by_hand_data.py"
_DATA = "tests/test_data.py"
_FAMILIES = "tests/test_family_truths.py"  # config.json read as transformers reads it, weight names, fp32 tensors


def _nodes(path: str, *names: str) -> list[str]:
    return [f"{path}::{name}" for name in names]


_CONFIG_TESTS = ["tests/test_convert_mapping.py", "tests/test_moe_config.py", _FAMILIES, *_nodes(
    _BY_HAND, "test_llama_config_defaults_are_transformers_defaults", "test_llama_biases_map_to_megatron_linear_biases",
    "test_omitted_tie_word_embeddings_means_the_transformers_default",
    "test_router_top_k_is_between_one_and_the_expert_count", "test_expert_groups_must_split_the_experts",
    "test_mlp_only_layers_edges", "test_deepseek_v2_configs_with_moe_layer_freq_one_convert")]
_SAMPLER_TRUTHS = [*_nodes(_DATA, "test_sampler_shards_cover_epoch_disjointly",
                           "test_sampler_epochs_deterministic_and_distinct", "test_sampler_resume_and_reshard",
                           "test_sampler_with_dataloader"),
                   *_nodes(_TRUTHS, "test_sampler_resumes_across_an_epoch_boundary",
                           "test_sampler_resumes_across_an_epoch_boundary_with_other_dp_size"),
                   *_nodes(_BY_HAND, "test_sampler_order_is_a_stable_function_of_seed_and_epoch"),
                   *_nodes(_DATA_BY_HAND, "test_sampler_length_is_what_it_yields",
                           "test_set_epoch_starts_that_epoch_from_its_first_index")]
_PACKING_TESTS = [*_nodes(_DATA, "test_first_fit_bins", "test_pack_samples_layout",
                          "test_packed_attention_matches_separate_documents"),
                  *_nodes(_DATA_BY_HAND, "test_bins_and_rows_filled_exactly_to_capacity",
                          "test_an_empty_packed_row_is_all_padding", "test_packed_attention_mask_of_a_batch_by_hand")]
_SFT_ROW_TESTS = [_DATA, *_nodes(_BY_HAND, "test_rows_end_with_eos_and_pad_with_the_pad_id",
                                 "test_smallest_sequence_length_is_two", "test_truncation_budgets_at_the_edge",
                                 "test_conversation_truncation_by_hand",
                                 "test_conversation_sample_labels_are_the_next_tokens"),
                  *_nodes(_DATA_BY_HAND, "test_the_shortest_sample_is_one_prompt_and_one_response_token",
                          "test_a_row_without_a_response_is_refused")]
TARGETS: dict[str, dict] = {
    "megagsm/rl/losses.py": {"tests": ["tests/test_policy_loss.py"]},
    "megagsm/rl/batching.py": {"tests": ["tests/test_rl_batching.py", _BY_HAND + "::test_default_advantages_are_std_normalised_by_hand"],
                               "functions": ["compute_advantages"]},
    "megagsm/rewards/gsm8k.py": {"tests": ["tests/test_rewards.py"]},
    "megagsm/data/packing.py": {"tests": _PACKING_TESTS},
    "megagsm/data/sft_dataset.py": {"tests": _SFT_ROW_TESTS},
    "megagsm/data/sampler.py": {"tests": _SAMPLER_TRUTHS},
    "megagsm/models/mapping.py": {"tests": ["tests/test_convert_mapping.py", _FAMILIES, _HF]},
    # the families that tests/test_hf_truths.py converts and runs (qwen2, gemma) against transformers
    **{f"megagsm/models/families/{name}.py": {"tests": [*_CONFIG_TESTS, _HF]}
       for name in ("dense", "gemma", "qwen2")},
    **{f"megagsm/models/families/{name}.py": {"tests": _CONFIG_TESTS}
       for name in ("base", "llama", "qwen3", "seed_oss", "moe", "qwen3_moe", "qwen2_moe", "deepseek",
                    "deepseek_v2", "deepseek_v3")},
    "megagsm/layers/norm.py": {"tests": ["tests/test_layers.py", "tests/test_fused_layers.py", _HF]},
    "megagsm/generation/sampling.py": {"tests": [_GEN + "test_sampler_greedy_and_degenerate_filters_agree",
                                                 _GEN + "test_sampler_vocab_limit_excludes_padded_rows",
                                                 _GEN + "test_sampler_distributions",
                                                 _GEN + "test_processed_logprobs_are_the_sampling_distribution",
                                                 _GEN + "test_sampling_params_validation_names_fields",
                                                 _GEN + "test_sampling_params_from_generation_config",
                                                 _BY_HAND + "::test_sampling_params_defaults",
                                                 _BY_HAND + "::test_top_k_at_or_above_the_vocabulary_is_off",
                                                 _BY_HAND + "::test_top_p_one_is_off",
                                                 _BY_HAND + "::test_top_p_drops_a_token_once_the_mass_before_it_equals_top_p",
                                                 _GEN + "test_inverse_cdf_draw_at_the_extremes_of_the_uniform",
                                                 _GEN + "test_sampler_forced_tokens_and_their_logprobs"]},
    # continuous batching: the one-process launch's refilled cases (greedy vs transformers and the
    # static path with forced lengths, static decode shapes, seeded sampling, MoE routing per sequence)
    "megagsm/generation/refill.py": {"tests": [_GEN + "test_refilled_generation_matches_transformers_and_the_static_path",
                                               _GEN + "test_refilled_static_decode_shapes",
                                               _GEN + "test_refilled_sampling_is_reproducible",
                                               _GEN + "test_refilled_moe_routing_per_sequence",
                                               # EP2 lockstep with uneven refills (slow-marked, cheap launch)
                                               "tests/test_generation_group_edges.py"],
                                     "slow": True,
                                     "max_mutants": 8},  # ~40 s per mutant, as engine.py
    # packed microbatches: rows, cu_seqlens, the [S, R] loss view, budget, even bins, DP placement,
    # packed loss and gradient = padded ones, THD RoPE = megatron's
    "megagsm/rl/packing.py": {"tests": ["tests/test_rl_packing.py"]},
    "megagsm/rl/balance.py": {"tests": ["tests/test_rl_packing.py"]},
    # THD attention in length buckets (shared prompts' continuations included) against the reference
    # formula in fp64 with gradients; thd_params / thd_rope / positions against megatron's RoPE
    "megagsm/layers/thd_buckets.py": {"tests": ["tests/test_layers.py"]},
    "megagsm/models/packed_seq.py": {"tests": ["tests/test_layers.py", "tests/test_rl_packing.py"]},
    # bit-for-bit against megatron's unfused MLP (one-process launch) and the fusion rule
    "megagsm/layers/swiglu.py": {"tests": ["tests/test_fused_layers.py"]},
    # the decode loop: the one-process launch (greedy vs transformers, log-probs, eos, stop strings)
    "megagsm/generation/engine.py": {"tests": [_GEN + "test_greedy_matches_transformers",
                                               _GEN + "test_sampling_logprobs_reproducibility_and_n",
                                               _GEN + "test_eos_stops_rows_and_compaction_keeps_the_others",
                                               _GEN + "test_stop_strings",
                                               _GEN + "test_compaction_moves_fill_holes_from_the_tail",
                                               # EP2 lockstep and a group stopped by one rank's KV cache:
                                               # slow-marked (test_generation.py's 2-rank launch covers
                                               # both in `make test`, but costs minutes per mutant)
                                               "tests/test_generation_group_edges.py"],
                                     "slow": True,
                                     "max_mutants": 8},  # ~40 s per mutant: the launch converts two models
    # the closed form at TP1 (test_independent_truths), then TP2 / TP2+SP against TP1 (test_lora's launch)
    "megagsm/models/lora.py": {"tests": [_TRUTHS, "tests/test_lora.py"]},
    "megagsm/sft/fused_ce.py": {"tests": [_FCE + "test_matches_plain_cross_entropy_single_process",
                                          _FCE + "test_loss_tokens_only_skips_masked_tokens_exactly",
                                          _FCE + "test_frozen_weight_gets_no_gradient",
                                          _TRUTHS + "::test_chunked_cross_entropy_is_a_full_vocab_softmax",
                                          _BY_HAND + "::test_chunked_loss_needs_a_positive_chunk_size",
                                          # TP2 (+SP) against megatron's vocab-parallel cross-entropy
                                          _FCE + "test_function_matches_megatron_vocab_parallel_cross_entropy",
                                          _FCE + "test_gpt_training_step_matches_plain_loss"]},
    "megagsm/models/training.py": {"tests": [_TRUTHS],
                                   "functions": ["masked_token_loss", "_global_loss", "train_step", "wrap_ddp"]},
}

# The weak spots of issue 17, each planted as the realistic bug it stands for: `--planted` checks that
# the named tests catch every one (old text must occur exactly once in the module).
T = "tests/test_independent_truths.py::"
H = "tests/test_hf_truths.py::"
PLANTED: list[dict] = [
    {"name": "LoRA scale inverted (rank / alpha)", "module": "megagsm/models/lora.py",
     "old": "self.scaling = alpha / rank", "new": "self.scaling = rank / alpha",
     "tests": [T + "test_lora_linear_is_the_closed_form"]},
    {"name": "LoRA dropout not applied in training", "module": "megagsm/models/lora.py",
     "old": "h = F.linear(self._dropout(x), self.weight_a) * self.scaling\n            if tp:\n                h = (gather",
     "new": "h = F.linear(x, self.weight_a) * self.scaling\n            if tp:\n                h = (gather",
     "tests": [T + "test_lora_linear_is_the_closed_form"]},
    {"name": "sampler forgets the epoch on resume", "module": "megagsm/data/sampler.py",
     "old": 'self.epoch, self.offset = int(state["epoch"]), offset', "new": "self.epoch, self.offset = 0, offset",
     "tests": [T + "test_sampler_resumes_across_an_epoch_boundary"]},
    {"name": "tied lm_head check removed", "module": "megagsm/checkpoint/hf_to_mcore.py",
     "old": "    _check_tied(provider, files)\n", "new": "",
     "tests": [H + "test_tied_model_with_a_different_lm_head_is_refused"]},
    {"name": "Gemma embedding scale not rounded to the dtype", "module": "megagsm/models/families/gemma.py",
     "old": "return output * scale.to(output.device, output.dtype)",
     "new": "return output * math.sqrt(module.config.hidden_size)",
     "tests": [H + "test_gemma_bf16_embedding_scale_is_rounded_like_transformers"]},
    {"name": "loss divided by each microbatch's own token count", "module": "megagsm/models/training.py",
     "old": 'return loss_sum, num_tokens, {"lm_loss": report}',
     "new": 'return (loss_sum / num_tokens.clamp(min=1), torch.ones_like(num_tokens), '
            '{"lm_loss": torch.stack([loss_sum.detach() / mask.sum().clamp(min=1), torch.ones(())])})',
     "tests": [T + "test_loss_is_the_global_token_mean_over_unequal_microbatches"]},
    {"name": "temperature dropped from GSPO log-probs", "module": "megagsm/rl/logprobs.py",
     "old": "out = out / temperature if temperature not in (0.0, 1.0) else out.clone()", "new": "out = out.clone()",
     "tests": [T + "test_tempered_log_probs_and_entropy_are_a_full_vocab_softmax"]},
    {"name": "chunked CE gradient: + one_hot instead of -", "module": "megagsm/sft/fused_ce.py",
     "old": "probs[rows, local_target] -= not_masked", "new": "probs[rows, local_target] += not_masked",
     "tests": [T + "test_chunked_cross_entropy_is_a_full_vocab_softmax"]},
]

# Mutants no input can tell from the original, each with the reason (reviewable): the harness does not
# run them and samples the others. An entry names the module, the mutated line (stripped), the
# mutation as the report writes it and optionally `replacement` (the mutated node's new text) or `col`
# (1-based) when other mutants of that line are not equivalent. `make mutate` lists entries that name
# no existing mutant (the code moved: review the entry). Never add one because a test is hard to
# write: only when no behaviour can differ.
_2D = ("{what}: -1 and 1 name the same axis (`dim=-1` -> `dim=1`, or `unsqueeze(-1)` -> `unsqueeze(1)` "
       "of a 1-D tensor)")


def _same_axis(module: str, what: str, *lines: str) -> list[dict]:
    """`-1` -> `1` as an axis on each line, where every tensor there has the rank `what` states."""
    return [{"module": module, "line": line, "mutation": "USub removed", "replacement": "(1)",
             "why": _2D.format(what=what)} for line in lines]


EQUIVALENT: list[dict] = [
    *_same_axis("megagsm/rl/losses.py", "[B, T] per-token tensors (policy_loss refuses any other rank; "
                "aggregate_loss documents [B, T] and policy_loss is its only caller), [B] per-sequence ones",
                "token_sums = _masked_sum(loss_mat, mask, dim=-1)",
                "lengths = mask.sum(-1)",
                "per_seq = token_sums / (norm if norm is not None else loss_mat.shape[-1])",
                "lengths = mask.sum(-1).clamp(min=1)",
                "seq_log_ratio = _masked_sum(token_log_ratio, mask, dim=-1) / lengths  # [B]",
                "seq_advantage = _masked_sum(advantages, mask, dim=-1) / lengths",
                "loss_mat = seq_loss.unsqueeze(-1).expand_as(log_prob)",
                "clipped = seq_clipped.unsqueeze(-1).expand_as(log_prob)",
                "dual = seq_dual.unsqueeze(-1).expand_as(log_prob)",
                "ratio = seq_ratio.unsqueeze(-1).expand_as(log_prob)",
                "log_ratio = seq_log_ratio.detach().unsqueeze(-1) + log_prob - log_prob.detach()",
                "(mask.sum(-1) > 0).to(mask.dtype)),",
                "return advantages.unsqueeze(-1).to(torch.float32) * response_mask.to(torch.float32)"),
    *_same_axis("megagsm/rl/losses.py", "group_advantages' `grouped` is [groups, group_size] (a reshape(-1, G)), "
                "zero_std is [groups]",
                "mean = grouped.mean(-1, keepdim=True)",
                "zero_std = (grouped.amax(-1) == grouped.amin(-1))",
                "std = grouped.std(-1, keepdim=True)",
                "advantages = torch.where(zero_std.unsqueeze(-1), torch.zeros_like(advantages), advantages)"),
    *_same_axis("megagsm/rl/batching.py", "`grouped` is [groups, group_size] (a view(-1, G))",
                "zero_std = (grouped.amax(-1) == grouped.amin(-1)).repeat_interleave(rollouts.group_size)"),
    *_same_axis("megagsm/generation/sampling.py", "Sampler takes last-position logits [b, V] (the engine's "
                "only call), so scaled/candidate logits and probs "
                "are [b, V] or [b, k], choice [b, 1], tokens [b]",
                "if self.vocab_limit is not None and self.vocab_limit < logits.shape[-1]:",
                "tokens = full.argmax(dim=-1)",
                "if p.top_k > 0 and p.top_k < scaled.shape[-1]:",
                "cand_logits, cand_ids = scaled.topk(p.top_k, dim=-1)  # sorted, descending",
                "cand_logits, cand_ids = scaled.sort(dim=-1, descending=True)",
                "probs = torch.softmax(cand_logits, dim=-1)",
                "before = probs.cumsum(dim=-1) - probs",
                "tokens = choice.squeeze(-1) if cand_ids is None else cand_ids.gather(-1, choice).squeeze(-1)",
                "return tokens, torch.log_softmax(cand_logits, dim=-1).gather(-1, choice).squeeze(-1), full, scaled",
                "cumulative = probs.cumsum(dim=-1)",
                "picked = full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)",
                "return picked - torch.logsumexp(full, dim=-1)"),
    *_same_axis("megagsm/sft/fused_ce.py", "the chunked cross-entropy works on [s*b, h] rows: logits and "
                "probs are [rows, V], targets, maxima, sums and scales [rows]",
                "probs.div_(sum_exp.unsqueeze(-1))",
                "return probs.mul_(scale.unsqueeze(-1))",
                "chunk_max = logits.max(dim=-1)[0]",
                "logits.sub_(chunk_max.unsqueeze(-1))",
                "predicted = logits.gather(1, local_target[lo:hi].unsqueeze(-1)).squeeze(-1)",
                "chunk_sum = logits.exp_().sum(dim=-1)",
                "probs.sub_(logits_max[lo:hi].unsqueeze(-1)).exp_()"),
    {"module": "megagsm/models/families/deepseek.py",
     "line": "return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0", "mutation": "LtE -> Lt",
     "why": "at scale == 1 the other branch is 0.1 * mscale * log(1) + 1.0 == 1.0 exactly"},
    {"module": "megagsm/rl/losses.py", "line": "dual = (advantages < 0) & (loss > cap)", "mutation": "Lt -> LtE",
     "why": "at advantage 0 both the loss (-0 * ratio, ratios are clamped finite) and the cap (-0 * c) are "
            "+-0.0, so `loss > cap` is False and nothing is capped either way"},
    {"module": "megagsm/rl/losses.py", "line": "log_ratio = log_ratio.clamp(-20.0, 20.0)",
     "mutation": "constant 20.0 -> 40.0",
     "why": "the result is clamped to 10, which k3 reaches at log-ratio 11 (and -2.7): beyond +-20 it is 10 "
            "with no gradient under either bound, and exp(40) is still finite in fp32 and bf16"},
    {"module": "megagsm/data/sampler.py", "line": "generator.manual_seed((self.seed * 1_000_003 + epoch) % (2**63))",
     "mutation": "constant 63 -> 64",
     "why": "torch's CPU generator (mt19937) is seeded from the low 32 bits of the seed, which x mod 2^63 and "
            "x mod 2^64 share (the same permutation for every seed and epoch)"},
    {"module": "megagsm/generation/refill.py",
     "line": "lockstep = dist.is_initialized() and ps.get_expert_model_parallel_world_size() > 1",
     "mutation": "And -> Or",
     "why": "without a process group megatron's expert-parallel size reads 0 (its groups cannot exist), so "
            "`> 1` is False either way; with one, both operands are evaluated as before"},
    {"module": "megagsm/generation/refill.py", "line": "chunks = self._agree(False, len(plan))[1]",
     "mutation": "constant False -> True",
     "why": "only the prefill count ([1]) is read, and _agree takes the maximum of each value separately"},
    {"module": "megagsm/layers/thd_buckets.py", "line": "_CACHE_SIZE = 4", "mutation": "constant 4 -> 5",
     "why": "how many plans are kept: a miss rebuilds the same plan from the same cu_seqlens"},
    {"module": "megagsm/layers/thd_buckets.py", "line": "@dataclass(frozen=True)", "mutation": "constant True -> False",
     "why": "frozen only forbids assigning a field after construction, which no code does"},
    {"module": "megagsm/models/packed_seq.py", "line": "if p >= d or (p >= 0 and prefix_of[p] >= 0):",
     "mutation": "GtE -> Gt", "col": 12,
     "why": "p == d is refused by the second clause either way: then prefix_of[p] is p itself, >= 0"},
    {"module": "megagsm/models/packed_seq.py", "line": "if p >= d or (p >= 0 and prefix_of[p] >= 0):",
     "mutation": "constant 0 -> 1", "col": 28,
     "why": "p == 0 with prefix_of[0] >= 0 never gets here: document 0's own check (p >= d = 0) refused it first"},
    {"module": "megagsm/rl/packing.py", "line": "return len(unit[0].prompt) + sum(len(s.response) - 1 for s in unit)",
     "mutation": "constant 0 -> 1",
     "why": "a unit of several sequences (the one-sequence case returns before) holds one group's sequences "
            "with equal prompts (prompt_units joins only those), so unit[1].prompt is unit[0].prompt's value"},
    {"module": "megagsm/models/training.py", "line": "overlap_grad_reduce=False,", "mutation": "constant False -> True",
     "why": "a scheduling flag: megatron then issues the same data-parallel all-reduces from backward hooks, "
            "during the backward instead of after it, so the reduced gradients are the same sums (DP2 training "
            "in tests/test_fused_ce.py passes with it on); its only other effect, megatron's assertion that "
            "every trainable parameter receives a gradient each step, holds for every model here"},
]
