"""Whisper in graft: what is unique to the family (parity, loading and saving are in
test_seq2seq_families.py with the other encoder-decoders): key projections without bias, the fused
Q/K/V kernel around them, the language/task prompt, and the real whisper-base (slow) against
transformers on a spoken clip."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import hf_model

from graft import kernels
from graft.errors import GraftError
from graft.loading import load_model
from graft.models.whisper import WhisperPrompt
from graft.speech import WhisperFeatures, read_audio

FOX = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="session")
def fox_clip(tmp_path_factory) -> Path:
    """espeak-ng saying the pangram (22,050 Hz WAV)."""
    assert shutil.which("espeak-ng"), "apt-get install -y espeak-ng (part of the test setup, .ci/run)"
    path = tmp_path_factory.mktemp("speech") / "fox.wav"
    subprocess.run(["espeak-ng", "-w", str(path), FOX], check=True, capture_output=True)
    return path


def test_key_projections_have_no_bias(tmp_path) -> None:
    hf_model("whisper").save_pretrained(tmp_path)
    model = load_model(tmp_path, kernels=False)
    for stack in (model.encoder, model.decoder):
        for block in stack.layers:
            attentions = [block.attn] + ([block.cross_attn] if block.cross_attn is not None else [])
            for attn in attentions:
                assert attn.k.bias is None and attn.q.bias is not None and attn.v.bias is not None


def test_fused_qkv_kernel_without_a_key_bias(tmp_path) -> None:
    """Inside ``frozen`` the kernels run Q, K and V as one multiply, with zeros for the key's bias."""
    ref = hf_model("whisper")
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    ref.save_pretrained(tmp_path)
    model = load_model(tmp_path, kernels=True)
    features = torch.randn(2, 8, 24)
    ids = torch.tensor([[3, 5, 6, 7], [3, 8, 9, 10]])
    with torch.no_grad(), kernels.frozen(model):
        got = model(input_features=features, decoder_input_ids=ids)
    expected = ref(input_features=features, decoder_input_ids=ids)
    assert (got.last_hidden_state - expected.last_hidden_state).abs().max() <= 1e-5
    assert (got.encoder_last_hidden_state - expected.encoder_last_hidden_state).abs().max() <= 1e-5


GENERATION = {
    "decoder_start_token_id": 50258,
    "eos_token_id": 50257,
    "lang_to_id": {"<|en|>": 50259, "<|de|>": 50261},
    "task_to_id": {"translate": 50358, "transcribe": 50359},
    "no_timestamps_token_id": 50363,
    "suppress_tokens": [1, 2],
    "begin_suppress_tokens": [220, 50257],
}


def test_prompt_tokens() -> None:
    prompt = WhisperPrompt.from_generation_config(GENERATION)
    assert prompt.tokens() == [50258, 50259, 50359, 50363]
    assert prompt.tokens("de", "translate") == [50258, 50261, 50358, 50363]
    assert (prompt.suppress, prompt.begin_suppress, prompt.eos) == ((1, 2), (220, 50257), 50257)
    english_only = WhisperPrompt.from_generation_config({**GENERATION, "lang_to_id": {}, "task_to_id": {}})
    assert english_only.tokens("de") == [50258, 50363]
    with pytest.raises(
        GraftError, match=r"^--language: 'e' is not one of the model's languages; did you mean 'en'\?$"
    ):
        prompt.tokens("e")
    with pytest.raises(
        GraftError, match=r"^--language: 'klingon' is not one of the model's languages \(known: de, en\)$"
    ):
        prompt.tokens("klingon")
    with pytest.raises(GraftError, match="^--task: 'summarize' must be one of translate, transcribe$"):
        prompt.tokens("en", "summarize")
    with pytest.raises(GraftError, match="^gen.json: suppress_tokens must be a list of token ids$"):
        WhisperPrompt.from_generation_config({**GENERATION, "suppress_tokens": "1"}, "gen.json")


@pytest.mark.slow
def test_whisper_base_logits_equal_transformers(whisper_base: Path, fox_clip: Path) -> None:
    """faster-whisper's weights, converted: graft (reference and kernels) and transformers give the
    same logits for a spoken clip and its transcript."""
    import transformers as tr

    ref = tr.WhisperForConditionalGeneration.from_pretrained(whisper_base).eval()
    features = WhisperFeatures.from_folder(whisper_base)([read_audio(fox_clip)])  # (1, 80, 3000)
    ids = torch.tensor(
        [[50258, 50259, 50359, 50363, 264, 1702, 6292, 21026, 3012, 670, 264, 14847, 3000, 13]]
    )
    with torch.no_grad():
        expected = ref(input_features=features, decoder_input_ids=ids).logits
        for use_kernels in (False, True):
            model = load_model(whisper_base, kernels=use_kernels)
            got = model(input_features=features, decoder_input_ids=ids).logits
            # fp32 sums in another order (oneDNN vs torch's BLAS) over 6 + 6 blocks: logits up to ~50
            assert (got - expected).abs().max() <= (1e-5 if not use_kernels else 5e-4) * expected.abs().max()
    assert expected[0, 3:-1].argmax(-1).tolist() == ids[0, 4:].tolist()  # the model reads the pangram


def converted(tmp_path: Path, ref) -> Path:
    """A Whisper with a Whisper tokenizer, as graft convert writes it from CTranslate2."""
    from test_ctranslate2 import ALIASES, model_bin, to_ctranslate2, write_folder

    from graft.io.ctranslate2 import convert_ctranslate2

    path = write_folder(tmp_path / "ct2", model_bin(to_ctranslate2(ref), ALIASES))
    return convert_ctranslate2(path, tmp_path / "tiny")


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    """A tiny random Whisper whose encoder holds 24 frames (not a 30 s window)."""
    from test_ctranslate2 import tiny_whisper

    return converted(tmp_path, tiny_whisper())


@pytest.fixture
def tiny_window_folder(tmp_path) -> Path:
    """A tiny random Whisper reading whole 30-second windows (1500 positions)."""
    from test_ctranslate2 import tiny_whisper

    return converted(tmp_path, tiny_whisper(max_source_positions=1500, biases=False))


def test_speech_batches_train_as_transformers_computes_the_loss(tiny_window_folder: Path) -> None:
    """Audio and transcripts -> features, the prompt + text as decoder inputs, the text + eos as
    labels (the forced prompt out of the loss); the loss equals WhisperForConditionalGeneration's."""
    import numpy as np
    import transformers as tr

    from graft.tasks.speech import collate_speech
    from graft.tokenizer import Tokenizer

    model = load_model(tiny_window_folder, kernels=False)
    tokenizer = Tokenizer.from_folder(tiny_window_folder)
    rng = np.random.default_rng(0)
    records = [{"audio": rng.standard_normal(8000).astype(np.float32), "text": t} for t in ("abc", "ba")]
    batch = model.head.collate(records, tokenizer)
    assert batch.keys() == collate_speech(model.config, records, tokenizer).keys()
    prompt = [21, 22, 25, 29]  # <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>
    a, b, c = tokenizer.convert_tokens_to_ids(["a", "b", "c"])
    assert batch["decoder_input_ids"].tolist() == [prompt + [a, b, c], prompt + [b, a, 20]]  # pad: eos
    assert batch["labels"].tolist() == [[-100] * 3 + [a, b, c, 20], [-100] * 3 + [b, a, 20, -100]]
    assert batch["input_features"].shape == (2, 8, 3000)
    ref = tr.WhisperForConditionalGeneration.from_pretrained(tiny_window_folder).eval()
    with torch.no_grad():
        expected = ref(
            **{k: batch[k] for k in ("decoder_input_ids", "labels")},
            input_features=batch["input_features"],
        )
        got = model(
            input_features=batch["input_features"],
            decoder_input_ids=batch["decoder_input_ids"],
            labels=batch["labels"],
        )
    assert abs(float(got.loss) - float(expected.loss)) <= 1e-5


@pytest.mark.parametrize("num_beams", [1, 3])
def test_transcriber_equals_transformers_generate(tiny_window_folder: Path, num_beams: int) -> None:
    """A tiny random Whisper reading 30-second windows (1500 positions): graft's transcriber and
    transformers' generate(language="en", task="transcribe") give the same tokens, suppressed ones
    included (the token the model likes most is suppressed, eos is not allowed first)."""
    import numpy as np
    import transformers as tr

    from graft.generation.speech import Transcriber

    folder = tiny_window_folder
    ref = tr.WhisperForConditionalGeneration.from_pretrained(folder).eval()
    rng = np.random.default_rng(0)
    clips = [
        rng.standard_normal(n).astype(np.float32) * s for n, s in ((16000, 0.1), (4000, 1.0), (30000, 0.5))
    ]
    features = WhisperFeatures(n_mels=8)(clips)
    with torch.no_grad():
        favourite = ref(
            input_features=features, decoder_input_ids=torch.tensor([[21, 22, 25, 29]] * 3)
        ).logits
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["suppress_tokens"] = [int(favourite[:, -1].argmax(-1).mode().values)]
    (folder / "generation_config.json").write_text(json.dumps(generation))
    ref = tr.WhisperForConditionalGeneration.from_pretrained(folder).eval()  # with that config

    ours = Transcriber(load_model(folder), folder, num_beams=num_beams)
    got = [windows[0] for windows in ours.tokens(clips, batch_size=2)]
    with torch.no_grad():
        expected = ref.generate(features, language="en", task="transcribe", num_beams=num_beams).tolist()
    expected = [row[: row.index(20)] if 20 in row else row for row in expected]  # up to eos, as ours
    assert got == expected and any(len(row) > 2 for row in got)
    assert all(generation["suppress_tokens"][0] not in row for row in got)


def test_transcribe_needs_whisper(tmp_path) -> None:
    from graft.generation.speech import Transcriber

    hf_model("bart", "seq2seq").save_pretrained(tmp_path)
    with pytest.raises(GraftError, match=f"^{tmp_path}: a bart model cannot transcribe speech"):
        Transcriber(load_model(tmp_path), tmp_path)


@pytest.mark.slow
def test_whisper_base_transcribes_as_transformers(whisper_base: Path, fox_clip: Path, cli) -> None:
    """graft transcribe on the espeak-ng pangram says what transformers says with the same weights."""
    import transformers as tr

    ref = tr.WhisperForConditionalGeneration.from_pretrained(whisper_base).eval()
    processor = tr.WhisperProcessor.from_pretrained(whisper_base)
    audio = read_audio(fox_clip)
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        ids = ref.generate(features, language="en", task="transcribe")
    expected = processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
    assert "quick brown fox" in expected.lower()
    result = cli("transcribe", whisper_base, fox_clip, fox_clip, "--format", "jsonl").ok()
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines == [{"audio": str(fox_clip), "text": expected}] * 2


@pytest.mark.slow
def test_whisper_base_detects_the_language_as_transformers(whisper_base: Path, fox_clip: Path, cli) -> None:
    """The likeliest language token after <|startoftranscript|> (transformers' detect_language);
    graft transcribe --language auto then says what --language en says."""
    import transformers as tr

    from graft.generation.speech import Transcriber
    from graft.loading import load_model

    ref = tr.WhisperForConditionalGeneration.from_pretrained(whisper_base).eval()
    processor = tr.WhisperProcessor.from_pretrained(whisper_base)
    features = processor.feature_extractor(
        read_audio(fox_clip), sampling_rate=16000, return_tensors="pt"
    ).input_features
    with torch.no_grad():
        token = int(ref.detect_language(features)[0])
    transcriber = Transcriber(load_model(whisper_base, task="seq2seq"), whisper_base)
    assert transcriber.detect(transcriber.features([read_audio(fox_clip)])) == ["en"]
    assert transcriber.prompt.languages["en"] == token
    auto = cli("transcribe", whisper_base, fox_clip, "--language", "auto").ok().stdout
    assert auto == cli("transcribe", whisper_base, fox_clip).ok().stdout


def test_transcribe_errors(tmp_path: Path, tiny_folder: Path, cli) -> None:
    import numpy as np
    import soundfile

    soundfile.write(tmp_path / "a.wav", np.zeros(1600, np.float32), 16000)
    line = cli("transcribe", tiny_folder, tmp_path / "nope.wav").error_line()
    assert line == f"error: {tmp_path / 'nope.wav'}: no such audio file"
    line = cli("transcribe", tiny_folder, tmp_path / "a.wav").error_line()  # 12 encoder positions
    assert line == (
        f"error: {tiny_folder}: a 30 s window is 3000 frames, more than the encoder's 24 (max_source_positions 12)"
    )
    hf_model("bart", "seq2seq").save_pretrained(tmp_path / "bart")
    line = cli("transcribe", tmp_path / "bart", tmp_path / "a.wav").error_line()
    assert (
        line
        == f"error: {tmp_path / 'bart'}: a bart model cannot transcribe speech (transcribe needs Whisper)"
    )


@pytest.mark.slow
def test_eval_on_a_speech_data_set(whisper_base: Path, fox_clip: Path, tmp_path: Path, cli) -> None:
    """graft eval on a Whisper model reads a CSV of path,text and reports WER and CER against it."""
    from graft.metrics import compute_metrics

    (tmp_path / "data.csv").write_text(f"path,text\n{fox_clip},{FOX}\n")
    result = cli("eval", whisper_base, "--data", tmp_path / "data.csv", "--out", tmp_path / "out").ok()
    metrics = json.loads(result.stdout)
    heard = json.loads((tmp_path / "out" / "predictions.jsonl").read_text())["prediction"]
    assert "quick brown fox" in heard.lower()
    assert metrics == {**compute_metrics("speech", [heard], [FOX]), "examples": 1}
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == metrics
