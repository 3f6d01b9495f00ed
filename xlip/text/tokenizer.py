"""WordPiece tokenizer: trained on the user's reports, or loaded from a local HF directory."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from transformers import BertTokenizerFast, PreTrainedTokenizerFast

from xlip.errors import InputError, MissingFileError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 4000,
                    min_frequency: int = 2) -> BertTokenizerFast:
    """Train an uncased BERT WordPiece vocabulary on ``texts`` and save it to ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import WordPieceTrainer

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                               special_tokens=SPECIAL_TOKENS)
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise InputError("tokenizer training got no non-empty text")
    tok.train_from_iterator(texts, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = BertTokenizerFast(tokenizer_object=tok, do_lower_case=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return load_tokenizer(out)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a fast tokenizer from a local directory (no network)."""
    p = Path(path)
    if not p.is_dir():
        raise MissingFileError(
            f"tokenizer directory {p} does not exist: train one with `xlip tokenizer train "
            f"MANIFEST --out {p}` or point text.tokenizer / text.pretrained at a local "
            "Hugging Face model directory")
    if not any((p / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
        raise MissingFileError(f"{p} holds no tokenizer.json or vocab.txt")
    try:
        tok = BertTokenizerFast.from_pretrained(str(p), local_files_only=True)
    except Exception as err:  # corrupt files: say which directory
        raise InputError(f"could not load a BERT tokenizer from {p}: {err}") from err
    if tok.mask_token_id is None or tok.pad_token_id is None or tok.cls_token_id is None:
        raise InputError(f"tokenizer in {p} lacks [MASK]/[PAD]/[CLS] tokens")
    return tok
