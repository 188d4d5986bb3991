"""Speech recognition with an encoder-decoder over audio frames (Whisper): the seq2seq head's
collation and metrics when its encoder reads audio (chapter 9).

A record is {"audio": a file path or 16 kHz samples, "text": the transcript} (graft.speech's
speech data sets). The batch holds the log-mel features of each clip (one 30-second window) and
the transcript as Whisper reads it: the decoder starts from <|startoftranscript|> <|en|>
<|transcribe|> <|notimestamps|> and learns the text and <|endoftext|> after them. The forced
prompt is not in the loss (-100): the model is never asked to predict it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from graft.errors import GraftError
from graft.metrics import compute_metrics
from graft.nn import EncoderDecoderConfig
from graft.speech import WhisperFeatures, read_audio
from graft.tasks.collate import pad

IGNORE = -100
PROMPT = ("<|startoftranscript|>", "<|{language}|>", "<|transcribe|>", "<|notimestamps|>")


def prompt_ids(tokenizer: Any, language: str = "en") -> list[int]:
    """The forced start of a transcript, from the tokenizer's special tokens."""
    tokens = [t.format(language=language) for t in PROMPT]
    ids = tokenizer.convert_tokens_to_ids(tokens)
    unknown = [t for t, i in zip(tokens, ids, strict=True) if i is None or i == tokenizer.unk_token_id]
    if unknown:
        raise GraftError(f"speech: the tokenizer has no {unknown[0]} token (a Whisper tokenizer has it)")
    return ids


def clip(record: dict[str, Any], where: str) -> np.ndarray:
    audio = record.get("audio")
    if audio is None:
        raise GraftError(f"{where}: speech records need an 'audio' field (a file, or 16 kHz samples)")
    return np.asarray(audio, dtype=np.float32) if isinstance(audio, np.ndarray | list) else read_audio(audio)


def check_window(cfg: EncoderDecoderConfig, features: WhisperFeatures, where: str) -> None:
    """The encoder must hold a whole window's frames (halved by its stride-2 convolution)."""
    positions = (features.n_frames + 1) // 2
    if positions > cfg.encoder.max_positions:
        raise GraftError(
            f"{where}: a {features.chunk_length} s window is {features.n_frames} frames, more than the encoder's"
            f" {2 * cfg.encoder.max_positions} (max_source_positions {cfg.encoder.max_positions})"
        )


def collate_speech(
    cfg: EncoderDecoderConfig, records: list[dict[str, Any]], tokenizer: Any, language: str = "en"
) -> dict[str, Any]:
    """Records -> input_features (B, mels, frames) and, when every record has a transcript,
    decoder_input_ids (B, T) and labels (B, T): the prompt and text, and the text and eos after it."""
    features = WhisperFeatures(n_mels=cfg.encoder.num_mel_bins)
    check_window(cfg, features, "speech")
    batch: dict[str, Any] = {
        "input_features": features([clip(r, f"record {i}") for i, r in enumerate(records)])
    }
    if not all(isinstance(r.get("text"), str) for r in records):
        return batch
    prompt = prompt_ids(tokenizer, language)
    limit = cfg.decoder.max_positions - len(prompt)  # the decoder's positions: prompt + text (+ eos as label)
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else tokenizer.eos_token_id
    texts = [
        tokenizer.encode(" " + r["text"].strip(), padding=False, truncation=False, add_special_tokens=False,
                         return_tensors=None).input_ids[0][:limit]
        for r in records
    ]  # fmt: skip
    inputs, _ = pad([prompt + t for t in texts], cfg.pad_token_id or 0)  # (B, T)
    labels, _ = pad([[IGNORE] * (len(prompt) - 1) + t + [eos] for t in texts], IGNORE)  # (B, T)
    batch |= {"decoder_input_ids": inputs, "labels": labels}
    return batch


def speech_metrics(predictions: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, float]:
    """WER and CER of the generated transcripts against the records' texts."""
    return compute_metrics("speech", [p["generated"] for p in predictions], [r["text"] for r in records])
