"""Text-only documents, and the file-level readers every document source shares.

Owns reading text documents into ``Sample([TextSegment(text, "assistant")])`` from three formats:
``jsonl`` (one JSON object per line, the text in a configurable field), ``webdataset`` (the text
in each ``KEY.txt`` tar member; other members are ignored) and ``parquet`` (a configurable string
column). It also owns ``DocumentFileSource``, the base of the document sources (this one and
``interleaved``): the deterministic order of one epoch (the file list permuted by a string-seeded
RNG per ``(seed, epoch)``, documents keeping their order inside a file) and the low-level readers
``iter_tar_groups``, ``iter_jsonl`` and ``iter_parquet_rows``.

Assumes file patterns use the caption reader's syntax (brace patterns, '::' lists; see
``expand_shards``). Tar shards are read by ``lvlm.data.sources.tar_groups`` (local ones without reading
image bytes until a sample is loaded, remote ones streamed); jsonl and parquet files must be local (pyarrow
is imported only to read parquet).
Nothing is fatal at iteration time; problems are counted in the ``SkipCounter``: ``missing_file``
(file absent), ``corrupt_shard`` (unreadable/truncated tar; the documents read before the damage
are kept), ``corrupt_file`` (unreadable parquet; rows read before are kept), ``bad_document``
(malformed JSON line, missing or non-string text field, a tar key without ``.txt``, undecodable
UTF-8) and ``empty_text`` (empty or whitespace-only text).
"""
from __future__ import annotations

import json
import os
import random
from functools import partial
from typing import Any, Iterator, Optional, Sequence


from lvlm.config.schema import TEXT_FORMATS
from lvlm.data.sample import Sample, TextSegment
from lvlm.data.skips import SkipCounter
from lvlm.data.sources import SampleRef, check_choice
from lvlm.data.sources.tar_groups import iter_tar_groups, read_member  # noqa: F401  (shared readers)
from lvlm.data.sources.webdataset_caption import _is_local, _local_path, expand_shards



# ---------------------------------------------------------------------------- shared readers


def iter_jsonl(path: str, skips: SkipCounter) -> Iterator[tuple[int, Any]]:
    """``(line_number, parsed value)`` per non-blank line (1-based); lines that are not valid UTF-8
    JSON count ``bad_document``; an absent file counts ``missing_file``."""
    if not os.path.isfile(path):
        skips.add("missing_file")
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield number, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                skips.add("bad_document")


def iter_parquet_rows(path: str, columns: Sequence[str], skips: SkipCounter) -> Iterator[tuple[int, dict]]:
    """``(row_index, {column: value})`` per row, streamed by record batch. Columns absent from the
    file are absent from the dicts (callers count them as bad documents); an unreadable file counts
    ``corrupt_file`` and keeps the rows read before; an absent file counts ``missing_file``."""
    if not os.path.isfile(path):
        skips.add("missing_file")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    index = 0
    try:
        parquet = pq.ParquetFile(path)
        present = [c for c in columns if c in parquet.schema_arrow.names]
        if not present:
            for index in range(parquet.metadata.num_rows):
                yield index, {}
            return
        for batch in parquet.iter_batches(columns=present):
            for row in batch.to_pylist():
                yield index, row
                index += 1
    except (pa.ArrowException, OSError):
        skips.add("corrupt_file")


# ---------------------------------------------------------------------------- shared source base


class DocumentFileSource:
    """A source reading documents from a list of files; subclasses implement ``_iter_file``."""

    order_tag = "lvlm.documents"
    """Prefix of the RNG seed string; distinct per source kind."""

    def __init__(self, files: str, *, remote_ok: bool, name: str) -> None:
        if not isinstance(files, str) or not files.strip():
            raise ValueError(f"files must be a non-empty file pattern, got {files!r}")
        self.pattern = files
        self.name = name
        self.files = expand_shards(files)
        if not self.files:
            raise FileNotFoundError(f"file pattern {files!r} expands to no file")
        remote = [u for u in self.files if not _is_local(_local_path(u))]
        if remote and not remote_ok:
            raise ValueError(f"{type(self).__name__} reads local files only; got {remote[0]!r}")
        if not remote and not any(os.path.isfile(_local_path(u)) for u in self.files):
            raise FileNotFoundError(
                f"no file matches {files!r} ({len(self.files)} path(s) tried, e.g. {self.files[0]!r})"
            )

    def file_order(self, seed: int, epoch: int) -> list[str]:
        """The file list permuted for ``(seed, epoch)`` (string-seeded: stable across processes)."""
        order = list(self.files)
        random.Random(f"{self.order_tag}/{seed}/{epoch}").shuffle(order)
        return order

    def iter_refs(self, seed: int, epoch: int, skips: SkipCounter) -> Iterator[SampleRef]:
        for url in self.file_order(seed, epoch):
            yield from self._iter_file(url, skips)

    def iter_samples(self, seed: int, epoch: int, skips: SkipCounter) -> Iterator[Sample]:
        for ref in self.iter_refs(seed, epoch, skips):
            yield ref.load()

    def _iter_file(self, url: str, skips: SkipCounter) -> Iterator[SampleRef]:
        raise NotImplementedError


def file_key(url: str, index: int) -> str:
    """Key of the ``index``-th document (line number, row index) of a file."""
    return f"{os.path.basename(_local_path(url))}:{index}"


# ---------------------------------------------------------------------------- text documents


class TextSource(DocumentFileSource):
    """Text-only documents from jsonl, webdataset or parquet files (see the module docstring)."""

    order_tag = "lvlm.text"

    def __init__(self, files: str, *, format: str = "jsonl", field: str = "text", name: str = "text") -> None:
        check_choice("format", format, TEXT_FORMATS, "a text")
        if not isinstance(field, str) or not field:
            raise ValueError(f"field must be a non-empty field/column name, got {field!r}")
        super().__init__(files, remote_ok=format == "webdataset", name=name)
        self.format = format
        self.field = field

    def _iter_file(self, url: str, skips: SkipCounter) -> Iterator[SampleRef]:
        if self.format == "webdataset":
            for key, group in iter_tar_groups(url, skips):
                if "txt" not in group:
                    skips.add("bad_document")
                    continue
                try:
                    text = group["txt"].decode("utf-8")
                except UnicodeDecodeError:
                    skips.add("bad_document")
                    continue
                ref = self._make_ref(text, key, url, skips)
                if ref is not None:
                    yield ref
            return
        if self.format == "jsonl":
            rows: Iterator[tuple[int, Any]] = iter_jsonl(url, skips)
        else:
            rows = iter_parquet_rows(url, [self.field], skips)
        for index, row in rows:
            if not isinstance(row, dict) or not isinstance(row.get(self.field), str):
                skips.add("bad_document")
                continue
            ref = self._make_ref(row[self.field], file_key(url, index), url, skips)
            if ref is not None:
                yield ref

    def _make_ref(self, text: str, key: str, url: str, skips: SkipCounter) -> Optional[SampleRef]:
        text = text.strip()
        if not text:
            skips.add("empty_text")
            return None
        return SampleRef(key=key, loader=partial(_build_text_sample, text, key, self.name, url))


def _build_text_sample(text: str, key: str, source: str, url: str) -> Sample:
    return Sample(segments=[TextSegment(text, role="assistant")], key=key, source=source, meta={"file": url})
