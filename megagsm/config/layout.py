"""Parallel-layout rules (megatron-core's), checked before any process group exists.

Pure functions: model providers call `validate_model_layout` once they have read a checkpoint's
sizes; `validate` calls the same rules with the sizes set in the config.
"""
from __future__ import annotations

from .errors import ConfigError
from .parallel import ParallelConfig

_SHOWN_DIVISORS = 12  # long divisor lists are cut: the message stays one readable line


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0] if n > 0 else []


def _allowed(n: int) -> str:
    ds = divisors(n)
    shown = ", ".join(str(d) for d in ds[:_SHOWN_DIVISORS])
    return f"allowed: {shown}{', ...' if len(ds) > _SHOWN_DIVISORS else ''}"


def _must_divide(problems: list[str], size_name: str, size: int, total_name: str, total: int) -> None:
    if total % size != 0:
        problems.append(f"{size_name}={size} does not divide {total_name}={total} ({_allowed(total)})")


def _nonpositive_sizes(parallel: ParallelConfig) -> list[str]:
    sizes = {"tp": parallel.tp, "pp": parallel.pp, "ep": parallel.ep, "cp": parallel.cp,
             "etp": parallel.etp, "vpp": parallel.vpp}
    return [f"parallel.{k}={v} must be >= 1" for k, v in sizes.items() if v is not None and v < 1]


def parallel_problems(parallel: ParallelConfig, world_size: int | None) -> list[str]:
    """Layout problems that need no model sizes: sizes >= 1 and world_size divisibility (skipped
    when world_size is None: not known yet)."""
    problems: list[str] = []
    if world_size is not None and world_size < 1:
        return [f"world_size={world_size} must be >= 1"]
    bad = _nonpositive_sizes(parallel)
    if bad:
        return bad  # every rule below divides by these
    p = parallel
    if world_size is not None:
        _must_divide(problems, f"parallel.tp*pp*cp ({p.tp}*{p.pp}*{p.cp})", p.tp * p.pp * p.cp,
                     "world_size", world_size)
        _must_divide(problems, f"parallel.etp*ep*pp ({p.expert_tp}*{p.ep}*{p.pp})", p.expert_tp * p.ep * p.pp,
                     "world_size", world_size)
    if p.vpp is not None and p.pp == 1:
        problems.append(f"parallel.vpp={p.vpp} needs parallel.pp > 1 (interleaved pipeline); "
                        "allowed at pp=1: null")
    return problems


# the rule names below as config fields
_CONFIG_NAMES = {"tp": "parallel.tp", "pp": "parallel.pp", "vpp": "parallel.vpp", "ep": "parallel.ep",
                 "num_layers": "model.num_layers", "num_attention_heads": "model.num_attention_heads",
                 "num_query_groups": "model.num_query_groups", "ffn_hidden_size": "model.ffn_hidden_size",
                 "num_experts": "model.num_experts"}


def divisibility_rules(parallel: ParallelConfig, num_layers: int | None, num_attention_heads: int | None,
                       num_query_groups: int | None, ffn_hidden_size: int | None,
                       num_experts: int | None) -> list[tuple[str, int, str, int]]:
    """megatron's layout rules as (divisor name, divisor, model size name, model size): the divisor must
    divide the size. The one rule set behind the config check (validate) and the model providers (which
    check the sizes they read from config.json); sizes that are None are not checked."""
    p, rules = parallel, []
    groups = num_query_groups if num_query_groups is not None else num_attention_heads
    if num_attention_heads is not None:
        rules.append(("tp", p.tp, "num_attention_heads", num_attention_heads))
    if groups is not None:
        # megatron-core would also accept tp a multiple of the groups (KV heads replicated across
        # TP ranks); the project's converters shard whole KV groups, so we require tp to divide.
        rules.append(("tp", p.tp, "num_query_groups", groups))
        if num_attention_heads is not None:
            rules.append(("num_query_groups", groups, "num_attention_heads", num_attention_heads))
    if ffn_hidden_size is not None:
        rules.append(("tp", p.tp, "ffn_hidden_size", ffn_hidden_size))
    if num_layers is not None:
        rules.append(("pp", p.pp, "num_layers", num_layers))
        if p.vpp is not None and num_layers % p.pp == 0:
            rules.append(("vpp", p.vpp, "layers per pipeline stage (model.num_layers/pp)", num_layers // p.pp))
    if num_experts is not None:
        rules.append(("ep", p.ep, "num_experts", num_experts))
    return rules


def model_problems(parallel: ParallelConfig, num_layers: int | None, num_attention_heads: int | None,
                   num_query_groups: int | None, num_experts: int | None,
                   ffn_hidden_size: int | None = None) -> list[str]:
    """Problems between model sizes and the layout; a size that is None is not checked."""
    if _nonpositive_sizes(parallel):
        return []  # reported by parallel_problems
    given = {"model.num_layers": num_layers, "model.num_attention_heads": num_attention_heads,
             "model.num_query_groups": num_query_groups, "model.ffn_hidden_size": ffn_hidden_size}
    problems = [f"{k}={v} must be >= 1" for k, v in given.items() if v is not None and v < 1]
    if problems:
        return problems
    p = parallel
    for layout_name, size, model_name, total in divisibility_rules(p, num_layers, num_attention_heads,
                                                                   num_query_groups, ffn_hidden_size, None):
        _must_divide(problems, _CONFIG_NAMES.get(layout_name, layout_name), size,
                     _CONFIG_NAMES.get(model_name, model_name), total)
    if num_experts is None:
        if p.ep > 1:
            problems.append(f"parallel.ep={p.ep} needs a MoE model but model.num_experts is unset "
                            "(allowed for dense models: 1)")
    elif num_experts < 1:
        problems.append(f"model.num_experts={num_experts} must be >= 1 (or null for a dense model)")
    else:
        _must_divide(problems, "parallel.ep", p.ep, "model.num_experts", num_experts)
    return problems


def validate_model_layout(num_layers: int | None, num_attention_heads: int | None,
                          num_query_groups: int | None, num_experts: int | None,
                          parallel: ParallelConfig, world_size: int, *,
                          ffn_hidden_size: int | None = None) -> None:
    """Raise ConfigError (all problems, one line) if this model cannot be laid out this way."""
    problems = parallel_problems(parallel, world_size)
    problems += model_problems(parallel, num_layers, num_attention_heads, num_query_groups,
                               num_experts, ffn_hidden_size)
    if problems:
        raise ConfigError("; ".join(problems))
