"""How each family's Hugging Face task classes lay out their heads: the one table every head reads.

A graft head is written once per task; what differs between BertForSequenceClassification,
RobertaForSequenceClassification, DistilBertForSequenceClassification... is only which body output
the head reads, whether a hidden layer sits before the output layer, the tensor names and which
config.json key holds the dropout rate. That is this table, so that task checkpoints load into
graft heads and save back with identical logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from graft.errors import GraftError
from graft.nn import TransformerConfig


@dataclass(frozen=True)
class HFHead:
    """One HF task class's head."""

    out: str  # the output Linear: "classifier", "score", "qa_outputs", ...
    # what the head reads: "pooler" (the body's dense + tanh on the first token), "cls" (the first
    # token), "last" (the last real token, for decoders), "mean", or "tokens" (every position)
    pooling: str = "tokens"
    dense: str | None = None  # a hidden Linear + activation before the output layer
    activation: str = "tanh"
    dropout_first: bool = False  # dropout also before the hidden layer (RoBERTa), not only after it
    dropout: tuple[str, ...] = ()  # config.json keys of the dropout rate; the first one set wins
    default_dropout: float = 0.1  # when none of those keys is set
    bias: bool = True  # the output layer has a bias
    body_prefix: str | None = None  # when the class names its body unlike the family's other classes

    def names(self) -> dict[str, str]:
        """HF tensor name -> graft head parameter name (``out`` and, if any, ``dense``)."""
        names = {f"{self.out}.weight": "out.weight"}
        if self.bias:
            names[f"{self.out}.bias"] = "out.bias"
        if self.dense:
            names.update({f"{self.dense}.weight": "dense.weight", f"{self.dense}.bias": "dense.bias"})
        return names

    def dropout_rate(self, hf: dict[str, Any]) -> float:
        if not self.dropout:
            return 0.0
        return next((float(hf[k]) for k in self.dropout if hf.get(k) is not None), self.default_dropout)


BERT_DROPOUT = ("classifier_dropout", "hidden_dropout_prob")
DECODER_DROPOUT = ("classifier_dropout", "hidden_dropout")

# family -> graft task -> the HF class's head
HF_HEADS: dict[str, dict[str, HFHead]] = {
    "bert": {
        "classification": HFHead("classifier", pooling="pooler", dropout=BERT_DROPOUT),
        "token-classification": HFHead("classifier", dropout=BERT_DROPOUT),
        "question-answering": HFHead("qa_outputs"),
    },
    "roberta": {
        "classification": HFHead(
            "classifier.out_proj",
            pooling="cls",
            dense="classifier.dense",
            dropout_first=True,
            dropout=BERT_DROPOUT,
        ),
        "token-classification": HFHead("classifier", dropout=BERT_DROPOUT),
        "question-answering": HFHead("qa_outputs"),
    },
    "distilbert": {
        "classification": HFHead(
            "classifier",
            pooling="cls",
            dense="pre_classifier",
            activation="relu",
            dropout=("seq_classif_dropout",),
            default_dropout=0.2,
        ),
        "token-classification": HFHead("classifier", dropout=("dropout",)),
        "question-answering": HFHead("qa_outputs", dropout=("qa_dropout",)),
    },
    "albert": {
        "classification": HFHead("classifier", pooling="pooler", dropout=("classifier_dropout_prob",)),
        "token-classification": HFHead(
            "classifier", dropout=("classifier_dropout_prob", "hidden_dropout_prob")
        ),
        "question-answering": HFHead("qa_outputs"),
    },
    "gpt2": {
        "classification": HFHead("score", pooling="last", bias=False),
        "token-classification": HFHead("classifier", dropout=DECODER_DROPOUT),
        "question-answering": HFHead("qa_outputs"),
    },
}

# Image models: the classifier reads [CLS] after the final norm, with no dropout before it
HF_HEADS["vit"] = HF_HEADS["deit"] = {"image-classification": HFHead("classifier", pooling="cls")}

# Families not listed above: transformers' generic task classes (Llama, Qwen2, Mistral...) for
# decoders, BERT-like names on the first token for encoders.
GENERIC_DECODER = {
    "classification": HFHead("score", pooling="last", bias=False),
    "token-classification": HFHead("score", dropout=DECODER_DROPOUT),
    "question-answering": HFHead("qa_outputs"),
}
GENERIC_ENCODER = {
    "classification": HFHead("classifier", pooling="cls", dropout=BERT_DROPOUT),
    "token-classification": HFHead("classifier", dropout=BERT_DROPOUT),
    "question-answering": HFHead("qa_outputs"),
}

# Llama's and Qwen2's question-answering classes keep the old body name "transformer." (not "model.")
HF_HEADS["llama"] = HF_HEADS["qwen2"] = {
    **GENERIC_DECODER,
    "question-answering": HFHead("qa_outputs", body_prefix="transformer."),
}


@dataclass(frozen=True)
class HFMaskedLMHead:
    """One HF *ForMaskedLM class's head: transform (dense, activation, LayerNorm), then a decoder whose
    weight is the word embeddings' (when tied) and whose bias is its own tensor."""

    dense: str
    norm: str
    decoder: str  # its weight is only in the checkpoint when not tied to the word embeddings
    bias: str
    activation: str | None = None  # None: the body's (config.json hidden_act); RoBERTa's is always gelu

    def names(self, tied: bool) -> dict[str, str]:
        """HF tensor name -> graft MaskedLMHead parameter name."""
        names = {f"{self.dense}.{p}": f"dense.{p}" for p in ("weight", "bias")}
        names |= {f"{self.norm}.{p}": f"norm.{p}" for p in ("weight", "bias")}
        names[self.bias] = "decoder.bias"
        if not tied:
            names[f"{self.decoder}.weight"] = "decoder.weight"
        return names


# family -> its *ForMaskedLM head (the masked-lm task); families not listed have none
HF_MLM_HEADS: dict[str, HFMaskedLMHead] = {
    "bert": HFMaskedLMHead(
        "cls.predictions.transform.dense",
        "cls.predictions.transform.LayerNorm",
        "cls.predictions.decoder",
        "cls.predictions.bias",
    ),
    "roberta": HFMaskedLMHead(
        "lm_head.dense", "lm_head.layer_norm", "lm_head.decoder", "lm_head.bias", "gelu"
    ),
    "distilbert": HFMaskedLMHead(
        "vocab_transform", "vocab_layer_norm", "vocab_projector", "vocab_projector.bias"
    ),
    "albert": HFMaskedLMHead(
        "predictions.dense", "predictions.LayerNorm", "predictions.decoder", "predictions.bias"
    ),
}


def hf_mlm_head(cfg: TransformerConfig) -> HFMaskedLMHead:
    """The HF layout of the masked-lm head on a body of this config."""
    if cfg.family not in HF_MLM_HEADS:
        raise GraftError(
            f"a {cfg.family} model has no masked-lm head (families with one: {', '.join(sorted(HF_MLM_HEADS))})"
        )
    return HF_MLM_HEADS[cfg.family]


def hf_head(cfg: TransformerConfig, task: str) -> HFHead:
    """The HF layout of ``task``'s head on a body of this config."""
    table = HF_HEADS.get(cfg.family) or (GENERIC_DECODER if cfg.causal else GENERIC_ENCODER)
    if task not in table:
        raise GraftError(f"a {cfg.family} model has no {task} head (its tasks: {', '.join(table)})")
    return table[task]


def body_prefix(cfg: TransformerConfig, task: str) -> str | None:
    """The prefix of body tensors in ``task``'s HF checkpoint when it is not the family's usual one."""
    table = HF_HEADS.get(cfg.family) or (GENERIC_DECODER if cfg.causal else GENERIC_ENCODER)
    return table[task].body_prefix if task in table else None


@dataclass(frozen=True)
class HFSeq2SeqHead:
    """How a family's ...ForConditionalGeneration class turns the decoder's output into logits."""

    out: str = (
        "lm_head"  # the output Linear (no bias), tied to the token table unless tie_word_embeddings is false
    )
    bias: str | None = None  # a (1, V) buffer added to the logits (BART's final_logits_bias)
    # T5 multiplies the decoder's output by d_model ** -0.5 before the output layer when this config.json
    # key says so (transformers 5 writes it); older configs: when tie_word_embeddings is not false (v1.0)
    scale: str | None = None


HF_SEQ2SEQ_HEADS: dict[str, HFSeq2SeqHead] = {
    "bart": HFSeq2SeqHead(bias="final_logits_bias"),
    "mbart": HFSeq2SeqHead(bias="final_logits_bias"),
    "t5": HFSeq2SeqHead(scale="scale_decoder_outputs"),
    "whisper": HFSeq2SeqHead(out="proj_out"),
}


def hf_seq2seq_head(family: str | None) -> HFSeq2SeqHead:
    return HF_SEQ2SEQ_HEADS.get(family or "", HFSeq2SeqHead())
