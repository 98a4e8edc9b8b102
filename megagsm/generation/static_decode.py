"""A decoding forward with static shapes, so that a CUDA graph can capture it (generation.cuda_graphs).

Every call runs all of the cache's rows (live rows first; the free ones are fed token 0 at column 0,
which the next prefill of that row overwrites) against the whole key width, the per-row columns
masking what each row may see. Inputs live in persistent buffers that are filled in place, and the
write columns are a device tensor the attention layers index with (rope_cache.py, per-row decoding):
nothing a step changes is a Python number baked into the forward.

On CUDA the first call warms up on a side stream, captures one torch.cuda.CUDAGraph and replays it
from then on; elsewhere (the CPU tests of this mode) the same buffers run eagerly. Capture covers the
model's forward only (sampling stays outside); pipeline sends and MoE token exchanges are not
captured (refill.py refuses them). Unmeasured on a GPU so far.
"""
from __future__ import annotations

import torch


class StaticDecode:
    def __init__(self, runner, cache, capture: bool):
        self.runner, self.cache, self.capture = runner, cache, capture
        rows, width = cache.max_batch_size, cache.max_sequence_length
        device = runner.device
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.columns = torch.zeros(rows, dtype=torch.long, device=device)
        self.rows = torch.arange(rows, device=device)
        self.key_columns = torch.arange(width, device=device)
        self.graph = None
        self.logits = None

    def __call__(self, tokens: torch.Tensor, columns: torch.Tensor) -> torch.Tensor | None:
        """tokens, columns [b] (CPU) of the live rows; returns their logits [b, V] (last stage)."""
        b = len(tokens)
        self.tokens.zero_()
        self.tokens[:b, 0] = tokens.to(self.tokens.device)
        self.columns.zero_()
        self.columns[:b] = columns.to(self.columns.device)
        cache = self.cache
        cache.row_columns, cache.row_index, cache.key_width = self.columns, self.rows, len(self.key_columns)
        try:
            if not self.capture:
                logits = self._forward()
            else:
                if self.graph is None:
                    self._capture()
                self.graph.replay()
                logits = self.logits
        finally:
            cache.row_columns = cache.row_index = None
        return None if logits is None else logits[:b]

    def _forward(self):
        rows, width = len(self.rows), len(self.key_columns)
        mask = (self.key_columns.unsqueeze(0) > self.columns.unsqueeze(1)).view(rows, 1, 1, width)
        return self.runner.forward(self.tokens, self.columns.view(rows, 1), mask, self.cache)

    def _capture(self):
        # warm-up forwards rewrite the same keys at the same columns: the cache is unchanged by them
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.cache.forward_id += 1  # RoPE cos/sin memoised during warm-up must not enter the graph
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
