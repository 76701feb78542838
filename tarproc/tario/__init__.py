"""Tar members <-> WebDataset samples: a streaming reader and a deterministic writer.

Pure standard library plus ``zstandard`` (imported only when zstd data is met). A sample is a
dict with ``"__key__"`` (str), ``"__url__"`` (where it was read from) and one ``bytes`` value per
extension; see ``iter_samples`` and ``TarWriter``.
"""

from .compress import compression_for_name, open_decompressed
from .reader import (
    StreamState,
    TarioWarning,
    decode_raw_sample,
    iter_chunk_samples,
    iter_chunks,
    iter_members,
    iter_raw_samples,
    iter_samples,
)
from .writer import TarWriter, encode_samples

__all__ = [
    "open_decompressed",
    "iter_members",
    "iter_samples",
    "iter_raw_samples",
    "decode_raw_sample",
    "iter_chunks",
    "iter_chunk_samples",
    "StreamState",
    "TarWriter",
    "encode_samples",
    "compression_for_name",
    "TarioWarning",
]
