"""GSM8K data: loading, prompts, SFT samples (packing, resumable sampler), synthetic problems, tokenizer."""

from megagsm.data.gsm8k import (
    BadRowError,
    BadRowReport,
    GSM8KExample,
    extract_final_answer,
    load_gsm8k,
    load_gsm8k_with_report,
    strip_calculator_annotations,
)
from megagsm.data.packing import PackedDataset, collate_packed, pack_samples, packed_attention_mask
from megagsm.data.prompts import DEFAULT_TEMPLATE, PromptTemplate, build_prompt, encode_prompt, get_template
from megagsm.data.sampler import ResumableShardedSampler
from megagsm.data.sft_dataset import SequenceTooLongError, SFTDataset, build_sft_sample, collate_sft

__all__ = [
    "BadRowError", "BadRowReport", "GSM8KExample", "extract_final_answer", "load_gsm8k", "load_gsm8k_with_report",
    "strip_calculator_annotations", "PackedDataset", "collate_packed", "pack_samples", "packed_attention_mask",
    "DEFAULT_TEMPLATE", "PromptTemplate", "build_prompt", "encode_prompt", "get_template",
    "ResumableShardedSampler", "SequenceTooLongError", "SFTDataset", "build_sft_sample", "collate_sft",
]
