"""Tiny model directories on disk (weights + a small BPE tokenizer trained offline), as a user would have."""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path

from biased_models import biased
from tiny_models import build


def tiny_tokenizer(vocab_size: int = 128):
    """A byte-level BPE tokenizer trained (deterministically) on moequant's shipped public-domain text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (resources.files("moequant") / "data" / "calibration_text.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "</s>"],
                                  initial_alphabet=[], show_progress=False)
    tok.train_from_iterator(text.splitlines()[:400], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def heldout_text(folder: Path) -> Path:
    text = (resources.files("moequant") / "data" / "calibration_text.txt").read_text(encoding="utf-8")
    path = folder / "heldout.txt"
    path.write_text(text[-20000:], encoding="utf-8")
    return path


def save_model_dir(folder: Path, family: str, dead_experts: bool = False) -> Path:
    model = biased(family) if dead_experts else build(family)
    model.save_pretrained(folder)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def tree_state(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` (symlinks as their target, directories as "dir") -> its content's sha256:
    equal before and after a run means nothing was written, removed or changed there."""
    state = {}
    for path in sorted(Path(folder).rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            state[key] = f"link -> {path.readlink()}"
        elif path.is_dir():
            state[key] = "dir"
        else:
            state[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


CUSTOM_CODE = '''
from pathlib import Path

from transformers import MixtralConfig, MixtralForCausalLM

Path({marker!r}).write_text("the model directory's code ran")


class CustomConfig(MixtralConfig):
    model_type = "moequant_custom"


class CustomForCausalLM(MixtralForCausalLM):
    config_class = CustomConfig
'''


def custom_code_model(folder: Path, source: Path, marker: Path, model_type: str = "moequant_custom") -> Path:
    """A copy of ``source`` (a tiny Mixtral directory) whose config.json's auto_map points at custom_moe.py,
    which writes ``marker`` when imported: the marker is the proof that the model directory's code ran."""
    shutil.copytree(source, folder)
    (folder / "custom_moe.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "custom_moe.CustomConfig",
                            "AutoModelForCausalLM": "custom_moe.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder
