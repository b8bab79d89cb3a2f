"""What the user points at: a model reference as typed, the model directory it names, and its custom code.

    resolve_model(ref, revision=None)       a local directory as it is; a hub id ``org/name`` (``revision``: a
                                            branch, tag or commit) as its snapshot folder in huggingface_hub's
                                            cache, downloaded there unless ``HF_HUB_OFFLINE`` is set
    check_model_dir(model_dir, trust_remote_code=False) -> transformers config; refuses, before transformers
                                            reads anything, a config.json that is not JSON, an unknown model
                                            type, and custom code (``auto_map``) the flag does not allow

Custom code: ``config.json``'s ``auto_map`` names classes in ``.py`` files of the model directory. transformers
imports them only when it has no class of its own for the ``model_type``; moequant passes
``trust_remote_code`` explicitly to every transformers load, so transformers never prompts on stdin (its prompt
runs the code on a "y"). Without the flag such a model is refused with one line; a model whose ``model_type``
transformers knows loads with transformers' own class even when it carries an ``auto_map`` (DeepSeek-V3's
official config does), and nothing from its directory runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from moequant.errors import MoequantError

# what quantize, eval and verify read from a hub snapshot: configs, the shard index, tokenizer, chat template
HUB_SMALL_FILES = ["*.json", "*.model", "*.tiktoken", "*.jinja", "merges.txt", "vocab.txt"]
INDEX_NAME, SINGLE_NAME = "model.safetensors.index.json", "model.safetensors"


class ModelDirError(MoequantError, ValueError):
    """The model directory is missing, not a Hugging Face model, or unreadable."""


def model_name(ref: str | os.PathLike) -> str:
    """The name a reference gives its outputs: the directory's name, or the repository's (``org/name`` -> name)."""
    return Path(str(ref)).name


def resolve_model(ref: str | os.PathLike, revision: str | None = None, *, trust_remote_code: bool = False) -> Path:
    """The local model directory ``ref`` names (see the module docstring); an existing path wins over a hub id.

    From the hub only what moequant reads is fetched: configs, tokenizer, chat template and the safetensors
    shards the index lists (never duplicate ``consolidated`` weights), plus the ``.py`` files with
    ``trust_remote_code``."""
    path = Path(ref).expanduser()
    if path.exists():
        if revision is not None:
            raise ModelDirError(f"--revision {revision} applies to hub ids, but {path} is a local directory; "
                                "drop --revision or give the hub id")
        return path
    repo_id = str(ref)
    if not _is_hub_id(repo_id):
        raise ModelDirError(f"{repo_id} is not a directory: give a local Hugging Face model directory or a hub id "
                            "such as Qwen/Qwen3-30B-A3B")
    return _snapshot(repo_id, revision, trust_remote_code)


def _is_hub_id(text: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _snapshot(repo_id: str, revision: str | None, trust_remote_code: bool) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = bool(constants.HF_HUB_OFFLINE)
    what = repo_id + (f" (revision {revision})" if revision else "")
    small = HUB_SMALL_FILES + (["*.py"] if trust_remote_code else [])
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=small, local_files_only=offline))
        shards = _shard_files(folder, what)
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=shards, local_files_only=offline))
    except LocalEntryNotFoundError:
        if offline:
            raise ModelDirError(f"{what}: no local directory of that name, and the hub model is not in the Hugging "
                                f"Face cache ({constants.HF_HUB_CACHE}) while HF_HUB_OFFLINE is set: download it "
                                f"first (hf download {repo_id}) or unset HF_HUB_OFFLINE") from None
        raise ModelDirError(f"{what}: no local directory of that name, the Hugging Face Hub cannot be reached and "
                            f"the model is not in the cache ({constants.HF_HUB_CACHE}); check the network") from None
    except HfHubHTTPError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelDirError(f"{what}: no local directory of that name, and the Hugging Face Hub refused the "
                            f"download ({reason}); check the id and revision, or log in (hf auth login) for a "
                            "gated or private model") from None
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        raise ModelDirError(f"{what}: the cached snapshot {folder} lacks {', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''}: download it again (hf download {repo_id})")
    return folder


def _shard_files(folder: Path, what: str) -> list[str]:
    """The safetensors files the snapshot's index lists (or the single ``model.safetensors``)."""
    index = folder / INDEX_NAME
    if not index.is_file():
        return [SINGLE_NAME]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ModelDirError(f"{what}: {index} is not a safetensors index (a JSON object with a 'weight_map'); "
                            "download the model again") from None


def read_config_json(model_dir: Path) -> dict:
    """``config.json`` as a dict; a file that is not a JSON object is an error naming it."""
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelDirError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}); "
                            "restore it from the original checkpoint") from None
    except UnicodeDecodeError:
        raise ModelDirError(f"{path} is not UTF-8 text; restore it from the original checkpoint") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{path} is not a JSON object; restore it from the original checkpoint")
    return config


def check_remote_code(model_dir: Path, config: dict, trust_remote_code: bool) -> None:
    """Refuse a model whose ``auto_map`` names code transformers would have to import, unless trusted."""
    from transformers import CONFIG_MAPPING

    auto_map = config.get("auto_map")
    if trust_remote_code or not auto_map or config.get("model_type") in CONFIG_MAPPING:
        return
    raise ModelDirError(f"{model_dir}: config.json's auto_map loads custom code ({', '.join(code_files(auto_map))}) "
                        f"for model_type {config.get('model_type')!r}, which transformers does not know; pass "
                        "--trust-remote-code (trust_remote_code=True) if you trust that code")


def code_files(auto_map: dict) -> list[str]:
    """``{"AutoConfig": "configuration_x.XConfig", ...}`` -> ``["configuration_x.py"]`` (upstream ``repo--`` kept)."""
    refs = []
    for value in auto_map.values() if isinstance(auto_map, dict) else []:
        refs += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)]
    return sorted({ref.rsplit(".", 1)[0] + ".py" for ref in refs}) or ["auto_map"]


def check_model_dir(model_dir: Path, trust_remote_code: bool = False):
    """The transformers config of a local HF model directory; errors name the directory and say what to do."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelDirError(f"{model_dir} is not a directory: give a local Hugging Face model directory")
    if not (model_dir / "config.json").is_file():
        raise ModelDirError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    raw = read_config_json(model_dir)
    check_remote_code(model_dir, raw, trust_remote_code)
    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError):
        import transformers

        raise ModelDirError(f"{model_dir}: architecture model_type={raw.get('model_type')!r} is unknown to "
                            f"transformers {transformers.__version__}; upgrade transformers or use a supported "
                            "model") from None
