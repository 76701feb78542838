"""Tar members <-> WebDataset samples: a streaming reader and a deterministic writer.

Pure standard library plus ``zstandard`` (imported only when zstd data is met). A sample is a
dict with ``"__key__"`` (str), ``"__url__"`` (where it was read from) and one ``bytes`` value per
extension; see ``iter_samples`` and ``TarWriter``.
"""

from .compress import compression_for_name, open_decompressed
from .reader import TarioWarning, iter_members, iter_samples
from .writer import TarWriter

__all__ = [
    "open_decompressed",
    "iter_members",
    "iter_samples",
    "TarWriter",
    "compression_for_name",
    "TarioWarning",
]
