"""In-process generation: the megatron model being trained samples its own rollouts.

Batched prefill + KV-cache decoding on a megatron-core GPTModel at the trainer's TP/PP/EP layout,
built on megatron's StaticInferenceContext (see kv_cache.py) and the model's own forward.

    out = generate(model, prompts_token_ids, SamplingParams(max_new_tokens=256, temperature=1.0,
                   n=8, seed=step, stop_token_ids=[eos]), tokenizer)
    out.tokens [N, T], out.logprobs [N, T] fp32, out.lengths [N], out.finish_reasons

Memory model (per rank):
- Weights: the trainer's parameters, read in place. No copy, no re-layout, no dtype cast;
  `generation_mode` switches to eval()/inference_mode and restores the previous mode afterwards. Grads,
  main-grad buffers and optimizer state are untouched and stay resident.
- Activations: training activations are gone once backward returns. Generation keeps none across
  steps (inference_mode): a step's working set is one layer's activations for the rows still running, plus
  last-position logits [rows, vocab] on the last pipeline stage.
- KV cache: 2 x layers-on-this-stage x rows x (longest prompt + max_new_tokens) x KV-heads-per-TP-rank
  x head_dim x dtype bytes, allocated once per generate() call before the prefill and checked against
  a budget (default 90% of free device memory; `kv_cache_bytes=`); a batch that does not fit raises
  KVCacheTooLarge naming those numbers. It is released when generate() returns, so the next training
  step gets the memory back (through the caching allocator on GPU).
- Rows: finished sequences leave the batch at once (their cache rows are overwritten by live ones),
  so compute follows the number of running sequences; n samples of a prompt share one prefill.

More prompts than one batch: `generate_refilled` (continuous batching, the default of
`generate_many`) keeps max_batch_size rows busy by prefilling waiting prompts into rows as they
free up; `generate_batched` (generation.continuous_batching=false) runs generate() per group.
"""
from megagsm.generation.batched import concat_outputs, generate_batched
from megagsm.generation.engine import GenerationOutput, generate
from megagsm.generation.kv_cache import KVCache, KVCacheTooLarge
from megagsm.generation.mode import generation_mode
from megagsm.generation.refill import generate_many, generate_refilled
from megagsm.generation.sampling import Sampler, SamplingParams
from megagsm.generation.stopping import FINISH_EOS, FINISH_LENGTH, FINISH_STOP_STRING

__all__ = [
    "FINISH_EOS", "FINISH_LENGTH", "FINISH_STOP_STRING", "GenerationOutput", "KVCache",
    "KVCacheTooLarge", "Sampler", "SamplingParams", "concat_outputs", "generate", "generate_batched",
    "generate_many", "generate_refilled", "generation_mode",
]
