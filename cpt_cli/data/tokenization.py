"""Tokenizers: load one (local folder or Hub id), or train a byte-level BPE on the run's sources.

A trained tokenizer is cached by a fingerprint of its training text and settings, so the three
quickstart stages and every rerun share one tokenizer instead of training it again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from cpt_cli.config import TokenizerTrainConfig
from cpt_cli.errors import UsageError, offline_note

SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
                  "unk_token": "<|unk|>"}


def load_tokenizer(name_or_path: str, *, revision: str | None = None,
                   trust_remote_code: bool = False, key: str = "model.tokenizer"
                   ) -> PreTrainedTokenizerBase:
    """A fast tokenizer with an EOS token (cpt joins documents with it). `key` is the recipe key
    that named it, for the messages."""
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, revision=revision,
                                            trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - a damaged tokenizer.json raises a bare Exception
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UsageError(f"{key}: could not load a tokenizer from {name_or_path!r}"
                         f"{offline_note(name_or_path, 'tokenizers')}: {reason}. "
                         "Give a folder with tokenizer files (tokenizer.json) or a Hub id, or "
                         "set model.tokenizer.") from None
    check_tokenizer(tok, name_or_path, key)
    return tok


def check_tokenizer(tok: PreTrainedTokenizerBase, where: str, key: str = "model.tokenizer"
                    ) -> None:
    if not getattr(tok, "is_fast", False):
        raise UsageError(f"{key}: the tokenizer in {where!r} is not a fast (Rust) tokenizer; cpt "
                         "needs one for cached tokenization. Convert it or pick another "
                         "tokenizer.")
    if tok.eos_token_id is None:
        raise UsageError(f"{key}: the tokenizer in {where!r} has no EOS token; cpt separates "
                         "packed documents with it. Set one (tokenizer.eos_token) and save it, "
                         "or use another tokenizer.")


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, normalizer, specials)."""
    h = hashlib.sha256(tok.backend_tokenizer.to_str().encode())
    h.update(str(tok.eos_token_id).encode())
    return h.hexdigest()


def train_tokenizer(texts: Iterable[str], config: TokenizerTrainConfig, cache_dir: Path,
                    text_fingerprint: str) -> PreTrainedTokenizerFast:
    """Train (or reuse from the cache) a byte-level BPE with BOS/EOS/PAD/UNK specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    key = hashlib.sha256(f"{text_fingerprint}|{config.vocab_size}|{config.min_frequency}|"
                         f"{config.max_chars}|bpe-v1".encode()).hexdigest()[:24]
    target = cache_dir / "tokenizers" / key
    if (target / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(target))

    def limited() -> Iterable[str]:
        remaining = int(config.max_chars)
        for text in texts:
            if remaining <= 0:
                return
            yield text[:remaining]
            remaining -= len(text)

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size, min_frequency=config.min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(limited(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}."))
    try:
        fast.save_pretrained(str(tmp))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "tokenizer.json").exists():
            raise
    return PreTrainedTokenizerFast.from_pretrained(str(target))
