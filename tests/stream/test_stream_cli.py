"""``moequant quantize`` streams by default; ``--no-stream`` (whole model in memory) writes the same bytes."""

from moequant.cli import main

FAST = ["--samples", "4", "--seq-len", "32", "--device", "cpu", "--quiet", "--kv-cache", "fp8"]


def test_cli_streamed_and_in_memory_write_the_same_checkpoint(model_dir, tmp_path, capsys):
    src = model_dir("qwen2_moe")
    assert main(["quantize", str(src), "-o", str(tmp_path / "streamed"), *FAST]) == 0
    assert "quantize+export (streamed)" in capsys.readouterr().out
    assert main(["quantize", str(src), "-o", str(tmp_path / "memory"), "--no-stream", *FAST]) == 0
    for f in sorted((tmp_path / "memory").iterdir()):
        if f.name not in ("report.html", "moequant_report.json"):   # these carry timings
            assert (tmp_path / "streamed" / f.name).read_bytes() == f.read_bytes(), f.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory", "streamed"]
