"""GSM8K-style data: loading (openai/gsm8k and verl layouts), prompts, SFT samples (packing, resumable
sampler, multi-turn), synthetic problems, tokenizer, and `python -m megagsm.data.prepare`."""

from megagsm.data.gsm8k import (
    BadRowError,
    BadRowReport,
    GSM8KExample,
    data_paths,
    extract_final_answer,
    load_gsm8k,
    load_gsm8k_files,
    load_gsm8k_with_report,
    strip_calculator_annotations,
)
from megagsm.data.sources import DataFileError, DataFileNotFoundError
from megagsm.data.packing import PackedDataset, collate_packed, pack_samples
from megagsm.data.prompts import (
    DEFAULT_TEMPLATE,
    PromptTemplate,
    build_example_prompt,
    build_prompt,
    encode_example_prompt,
    encode_prompt,
    get_template,
    truncate_prompt,
)
from megagsm.data.sampler import ResumableShardedSampler
from megagsm.data.sft_dataset import (
    SequenceTooLongError,
    SFTDataset,
    build_conversation_sample,
    build_sft_sample,
    collate_sft,
)

__all__ = [
    "BadRowError", "BadRowReport", "GSM8KExample", "data_paths", "extract_final_answer", "load_gsm8k",
    "load_gsm8k_files", "load_gsm8k_with_report", "strip_calculator_annotations", "DataFileError",
    "DataFileNotFoundError", "PackedDataset", "collate_packed", "pack_samples",
    "DEFAULT_TEMPLATE", "PromptTemplate", "build_example_prompt", "build_prompt", "encode_example_prompt",
    "encode_prompt", "get_template", "truncate_prompt", "ResumableShardedSampler", "SequenceTooLongError",
    "SFTDataset", "build_conversation_sample", "build_sft_sample", "collate_sft",
]
