"""Training data: sources, tokenization, document-aware packing, mixtures, offline corpora, decontamination."""

from xlstm_distill.data.decontam import NGramIndex, decontaminate, eval_items
from xlstm_distill.data.documents import long_documents
from xlstm_distill.data.encoding import encode_chat, encode_text
from xlstm_distill.data.offline import DOMAINS, build_offline_corpora, offline_sources
from xlstm_distill.data.packing import PackedDataset, collate
from xlstm_distill.data.sources import SUPPORTED_EXTENSIONS, Source
from xlstm_distill.data.split import HELD_OUT_EVERY, SPLIT_RULE, SPLITS, data_split, held_out_split, split_of

__all__ = [
    "DOMAINS",
    "HELD_OUT_EVERY",
    "SPLITS",
    "SPLIT_RULE",
    "NGramIndex",
    "PackedDataset",
    "SUPPORTED_EXTENSIONS",
    "Source",
    "build_offline_corpora",
    "collate",
    "data_split",
    "decontaminate",
    "encode_chat",
    "encode_text",
    "eval_items",
    "held_out_split",
    "long_documents",
    "offline_sources",
    "split_of",
]
