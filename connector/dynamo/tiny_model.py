"""A tiny local model folder that the real Dynamo mocker and frontend accept.

Dynamo's mocker and frontend load a model *folder* (``--model-path``): they read its
``config.json`` (architecture, context length), its ``tokenizer.json`` and the chat
template in ``tokenizer_config.json``; the mocker never loads weights. Fetching a real
model needs the Hugging Face hub, which tests and the demo must not depend on, so this
module writes a folder of its own, offline and deterministically:

* ``config.json``: a llama-shaped config with ``max_position_embeddings`` (the context
  length the mocker reports and the Planner needs for prefill scaling);
* ``tokenizer.json``: a byte-level BPE trained with the ``tokenizers`` library on generated
  words, vocabulary 4096. The mocker answers with random token ids in [1000, 2000), so the
  vocabulary must be larger than 2000 or every answer decodes to an empty string;
* ``tokenizer_config.json`` with a ``chat_template``: without one the frontend answers 404
  to chat *and* completion requests;
* ``generation_config.json`` (bos/eos ids) and a completion marker naming the version.

Writing takes well under a second; a folder already complete at this version is left as
is. From the shell: ``python -m connector.dynamo.tiny_model DIR [--name NAME]``.

``tokenizers`` comes with ``transformers`` (a Dynamo dependency), not with dynamo-local, so
it is imported only when a folder is actually written.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_NAME = "tiny-llama"
VERSION = 1
"""Bump whenever anything written changes: folders of another version are rewritten."""

VOCAB_SIZE = 4096
CONTEXT_LENGTH = 4096
SEED = 20380  # any fixed number: the same words, hence the same tokenizer, every time
WORD_COUNT = 4000

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2: BPE training puts specials first

MARKER = "dynamo_local_tiny_model.json"
FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")

# Role-tagged turns closed by the end-of-sequence token; written for the Rust minijinja
# engine the frontend uses (and Jinja2), so only plain loops, conditions and indexing.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class TinyModelError(RuntimeError):
    """The folder cannot be written (``tokenizers`` missing, a bad name, a disk error)."""


def write_tiny_model(folder: Path, name: str = DEFAULT_NAME) -> Path:
    """Write the tiny model into ``folder / name`` and return that path.

    Idempotent: when the folder already holds every file and the marker of this
    :data:`VERSION` and ``name``, nothing is written. Otherwise every file is written
    atomically (a temporary file, then a rename) and the marker last, so a reader never
    sees a half-written file and an interrupted write is redone by the next call, also when
    two processes write the same folder at once. ``name`` is also the model's name in its
    config; pass the same string as the mocker's ``--model-name``.
    """
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise TinyModelError(f"model name {name!r} must be one path component")
    target = Path(folder) / name
    expected = _marker(name)
    if _is_complete(target, expected):
        return target
    contents = _contents(name)
    try:
        target.mkdir(parents=True, exist_ok=True)
        for filename in FILES:
            _write_atomically(target / filename, contents[filename])
        _write_atomically(target / MARKER, _json(expected))
    except OSError as exc:
        raise TinyModelError(f"cannot write the tiny model to {target}: {exc}") from exc
    return target


def _marker(name: str) -> dict[str, Any]:
    return {"generator": "connector.dynamo.tiny_model", "version": VERSION, "name": name}


def _is_complete(target: Path, expected: dict[str, Any]) -> bool:
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == expected and all((target / f).is_file() for f in FILES)


def _contents(name: str) -> dict[str, str]:
    """Every file's text, keyed by file name."""
    config = {
        "_name_or_path": name,
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "hidden_act": "silu",
        "max_position_embeddings": CONTEXT_LENGTH,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(EOS),
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": CONTEXT_LENGTH,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    generation_config = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
    }
    return {
        "config.json": _json(config),
        "tokenizer.json": _train_tokenizer(),
        "tokenizer_config.json": _json(tokenizer_config),
        "generation_config.json": _json(generation_config),
    }


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, indent=2, sort_keys=True) + "\n"


def generated_words(count: int = WORD_COUNT, seed: int = SEED) -> list[str]:
    """``count`` pronounceable made-up words (1 to 4 syllables), the same for one seed."""
    rng = random.Random(seed)
    onsets = [*"bcdfghjklmnprstvwz", "ch", "sh", "th", "st", "tr", "pl", "gr"]
    vowels = [*"aeiou", "ai", "ea", "ou", "io"]
    codas = ["", "n", "r", "s", "t", "l", "m", "nd", "st", "ck"]
    return [
        "".join(
            rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas)
            for _ in range(rng.randint(1, 4))
        )
        for _ in range(count)
    ]


def _train_tokenizer() -> str:
    """A byte-level BPE of :data:`VOCAB_SIZE` tokens as ``tokenizer.json`` text.

    Byte-level, so any text a request sends encodes; trained on space-separated lines, so
    most tokens are whole words with their leading space and decoded answers read as words.
    Training is deterministic for the same corpus (checked by the tests).
    """
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as exc:
        raise TinyModelError(
            "writing the tiny model needs the 'tokenizers' package, which comes with "
            "transformers, a dependency of the real Dynamo; install the project's dynamo "
            "extra (scripts/setup.sh does)"
        ) from exc
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = generated_words()
    lines = [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    tokenizer.train_from_iterator(lines, trainer)
    size = tokenizer.get_vocab_size()
    if size != VOCAB_SIZE:  # too few distinct pairs in the corpus: a generator change broke it
        raise TinyModelError(f"the tiny tokenizer has {size} tokens, not {VOCAB_SIZE}")
    text: str = tokenizer.to_str()
    return text


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            # mkstemp makes the file private; a model folder is ordinary readable data.
            os.fchmod(f.fileno(), 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m connector.dynamo.tiny_model",
        description="Write a tiny model folder (config, tokenizer, chat template) that the "
        "Dynamo mocker and frontend accept; prints its path.",
    )
    parser.add_argument("folder", type=Path, help="parent folder; the model goes in FOLDER/NAME")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"model name (default {DEFAULT_NAME})")
    args = parser.parse_args(argv)
    try:
        path = write_tiny_model(args.folder, args.name)
    except TinyModelError as exc:
        print(f"tiny_model: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
