"""SentencePiece tokenizer training with LLM-style (Llama) defaults."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any, Iterator

import sentencepiece as spm

from ep_train.data.shards import sha256_file


def llm_defaults(vocab_size: int) -> dict[str, Any]:
    """Options as Llama-family tokenizers use them: BPE, byte fallback, digits split, text kept as is."""
    return dict(
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True, character_coverage=0.99995, max_sentencepiece_length=16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, input_sentence_size=2_000_000, shuffle_input_sentence=True,
        train_extremely_large_corpus=False, num_threads=2, minloglevel=2,
        # Whole lines up to this length feed training; longer ones are skipped by sentencepiece.
        max_sentence_length=16384,
    )


def document_lines(files: list[str], text_key: str) -> Iterator[str]:
    """The lines of the documents ``data_prep_tool build`` reads from ``files`` (plain text, JSON lines /
    arrays, parquet, arrow, gzip), in order, empty lines left out: what sentencepiece trains on. Given the
    JSON or gzip files themselves it read them as text lines, learning JSON's quotes, keys and escapes, and
    never saw the text inside a .gz."""
    from ep_train.data.prep import TEXT_SUFFIXES, _documents, _text_documents

    for f in files:
        path = Path(f)
        # a large text file in pieces: each ends after a newline, so its lines are the whole file's
        events = (_text_documents([path], in_pieces=True) if path.name.endswith(TEXT_SUFFIXES)
                  else _documents(path, text_key))
        for kind, doc, _ in events:
            text = doc.text if kind == "part" else doc if kind == "doc" else ""
            yield from (line for line in text.split("\n") if line)


def train_tokenizer(inputs: list[str], vocab_size: int, output_prefix: str, text_key: str = "text",
                    **overrides: Any) -> Path:
    """Train on local files; writes ``PREFIX.model``, ``PREFIX.vocab`` and ``PREFIX.json`` (options).
    Plain text files feed sentencepiece as they are; with any JSON, parquet, arrow or gzip input, every
    input is streamed to it as ``document_lines`` (nothing is written to disk; sentencepiece keeps at most
    ``input_sentence_size`` lines, sampled)."""
    opts = llm_defaults(vocab_size)
    unknown = set(overrides) - set(opts)
    if unknown:
        raise ValueError(f"unknown tokenizer option(s) {sorted(unknown)}; known: {sorted(opts)}")
    opts.update(overrides)
    missing = [p for p in inputs if not Path(p).is_file()]
    if missing:
        raise ValueError(f"--input file(s) not found: {missing[:5]}")
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    from ep_train.data.prep import TEXT_SUFFIXES  # here: prep imports this module

    if all(p.endswith(TEXT_SUFFIXES) and not p.endswith(".gz") for p in inputs):  # sentencepiece reads these
        _train({"input": list(inputs)}, output_prefix, vocab_size, opts)
    else:
        lines = document_lines(list(inputs), text_key)
        first = next(lines, None)
        if first is None:
            raise ValueError(f"--input {inputs[:3]} hold no text: empty or binary files, or rows without a string "
                             f"field {text_key!r} (see --text-key)")
        _train({"sentence_iterator": itertools.chain([first], lines)}, output_prefix, vocab_size, opts)
    model = Path(f"{output_prefix}.model")
    info = {"options": opts, "inputs": list(inputs), "sha256": sha256_file(model)}
    Path(f"{output_prefix}.json").write_text(json.dumps(info, indent=2))
    return model


def _train(source: dict[str, Any], output_prefix: str, vocab_size: int, opts: dict[str, Any]) -> None:
    try:
        spm.SentencePieceTrainer.train(**source, model_prefix=output_prefix, **opts)
    except RuntimeError as e:  # e.g. "Vocabulary size is smaller than required_chars", "too high"
        msg = str(e).split("]")[-1].strip()
        if "sentences_.empty()" in str(e):  # sentencepiece's failed check, with no text after it
            raise ValueError(f"--input {source.get('input', '')} holds no text sentencepiece can train on (empty "
                             "files, or only blank lines); pass the corpus") from None
        need = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
        if need:  # sentencepiece suggests its own --character_coverage flag, which this tool does not have
            raise ValueError(f"--vocab-size {vocab_size} is too small for this text: its characters alone need "
                             f"{need.group(2)} pieces; use --vocab-size {int(need.group(2)) + 1} or more") from None
        raise ValueError(f"sentencepiece refused --vocab-size {vocab_size} for this text: {msg or str(e).strip()}"
                         ) from None


def check_tokenizer_path(path: str | Path) -> Path:
    """The path of a tokenizer model file, or a ValueError naming what is there instead."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"tokenizer {str(path)!r} is a directory; give the sentencepiece .model file "
                         "(e.g. DIR/tokenizer.model, as data_prep_tool train-tokenizer writes it)")
    if not p.is_file():
        raise ValueError(f"tokenizer model {str(path)!r} not found; train one with data_prep_tool train-tokenizer")
    return p


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    check_tokenizer_path(path)
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{str(path)!r} is not a sentencepiece model ({e})") from None
    return sp


def splits_at_newlines(sp: spm.SentencePieceProcessor) -> bool:
    """Whether encoding a text in pieces that each end just after a newline gives exactly the tokens of
    the whole text (so a large document can be tokenized piece by piece in bounded memory).

    True when no piece of the vocabulary contains a newline and the normalizer keeps the text as it is
    (identity rule, no dummy prefix, no whitespace clean-up): BPE merges and the unigram lattice then never
    join symbols across the newline, and nothing is added or removed at a piece's edges. A newline must also
    stay a token of its own: a piece of the vocabulary, or bytes (byte fallback); otherwise it is unknown, and
    sentencepiece merges a run of unknown characters ("\n\n", "Q\nQ") into one <unk>. ep-train's tokenizers
    (trained on lines, ``llm_defaults``: byte fallback) qualify; Llama-2's (dummy prefix) does not."""
    from sentencepiece import sentencepiece_model_pb2 as pb  # protobuf: read the model's own settings

    m = pb.ModelProto()
    m.ParseFromString(sp.serialized_model_proto())
    norm = m.normalizer_spec
    if norm.precompiled_charsmap or norm.add_dummy_prefix or norm.remove_extra_whitespaces:
        return False
    kinds = (pb.ModelProto.SentencePiece.NORMAL, pb.ModelProto.SentencePiece.USER_DEFINED)
    texts = [piece.piece for piece in m.pieces if piece.type in kinds]
    if any("\n" in t and t != "\n" for t in texts):
        return False
    return m.trainer_spec.byte_fallback or "\n" in texts


def safe_decode(sp: spm.SentencePieceProcessor, ids: list[int]) -> tuple[str, int]:
    """Decode, showing ids outside the vocabulary as ``<id N out of range>`` instead of raising
    (sentencepiece raises IndexError on them). Returns (text, number of out-of-range ids)."""
    vocab = sp.get_piece_size()
    bad = sum(1 for i in ids if not 0 <= i < vocab)
    if not bad:
        return sp.decode(ids), 0
    parts, run = [], []
    for i in ids:
        if 0 <= i < vocab:
            run.append(i)
            continue
        parts.append(sp.decode(run))
        parts.append(f"<id {i} out of range>")
        run = []
    parts.append(sp.decode(run))
    return "".join(parts), bad
