"""Encoder-decoders exported as two graphs: the encoder (with every decoder layer's cross keys and
values, computed once) and one decoder-with-past graph. Parity on shapes not traced, and greedy
generation from ONNX equal to graft's, token for token, for every encoder-decoder family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from conftest import hf_model
from test_predict_cli import task_folder

from graft.export import MANIFEST, export_model
from graft.export.graph import EncoderGraph, example_inputs
from graft.export.runtime import Exported
from graft.generation import generate
from graft.loading import load_model
from graft.models import FAMILIES

ENCODER_DECODERS = [name for name, family in FAMILIES.items() if family.encoder_decoder]
TOL = 1e-4


def source(model, family: str) -> dict[str, torch.Tensor]:
    """4 sources of 13 tokens, 3 of them padded on the right (not the traced or checked shapes);
    Whisper's: 4 windows of log-mel frames."""
    return example_inputs(EncoderGraph(model), 4, 13, seed=7)


def lively(family: str) -> transformers.PreTrainedModel:
    """A tiny random seq2seq model whose greedy tokens change from step to step: at transformers'
    initial scale (std 0.02) a tiny model repeats one token, which would compare little."""
    model = hf_model(family, "seq2seq")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def graft_tokens(model, inputs: dict[str, torch.Tensor], steps: int, eos: list[int]) -> list[list[int]]:
    """graft's greedy tokens after the decoder's start token, each row cut after its first end token."""
    out = generate(model, inputs.get("input_ids"), inputs.get("attention_mask"), max_new_tokens=steps,
                   input_features=inputs.get("input_features"), eos_token_id=eos)  # fmt: skip
    rows = []
    for row in out[:, 1:].tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        rows.append(row[: ends[0] + 1] if ends else row)
    return rows


@pytest.mark.parametrize("family", ENCODER_DECODERS)
def test_onnx_greedy_generation_of_every_encoder_decoder_gives_graft_tokens(family, tmp_path):
    lively(family).save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf", task="seq2seq")
    manifest = export_model(model, tmp_path / "out")
    assert manifest["parity"]["max_abs_diff"] <= TOL
    assert manifest["cache"]["layout"] == "encoder + decoder-with-past"
    assert set(manifest["graphs"]) == {"encoder", "decoder"}
    assert {"encoder.onnx", "decoder.onnx", "config.json", MANIFEST} <= set(manifest["files"])
    decoder_inputs = [i["name"] for i in manifest["graphs"]["decoder"]["inputs"]]
    assert decoder_inputs[0] == "decoder_input_ids" and "cross.0.key" in decoder_inputs
    assert ("encoder_attention_mask" in decoder_inputs) == (family != "whisper")

    inputs = source(model, family)
    eos = [model.config.eos_token_id]
    expected = graft_tokens(model, inputs, 10, eos)
    assert max(len(row) for row in expected) > 3 and len({tuple(row) for row in expected}) > 1
    hf = model.config.hf_config  # BART forces its end token last, mBART its language first
    forced = {"forced_bos": hf.get("forced_bos_token_id"), "forced_eos": hf.get("forced_eos_token_id")}
    numpy = {k: v.numpy() for k, v in inputs.items()}
    got = Exported(tmp_path / "out").generate_seq2seq(numpy, 10, eos, **forced)
    assert got == expected


@pytest.mark.slow
@pytest.mark.parametrize("family", ENCODER_DECODERS)
def test_a_bare_encoder_decoder_exports_with_parity(family, tmp_path):
    """The bare body: the encoder's and the decoder's last hidden states within 1e-4 of graft's, on a
    padded batch and a decoder step after 5 cached positions."""
    hf_model(family).save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf", task="base")
    manifest = export_model(model, tmp_path / "out")
    assert manifest["task"] == "base"
    assert manifest["graphs"]["decoder"]["outputs"][0]["name"] == "last_hidden_state"
    exported = Exported(tmp_path / "out")
    inputs = source(model, family)
    mask = inputs.get("attention_mask")
    g = torch.Generator().manual_seed(3)
    target = torch.randint(4, model.config.decoder.vocab_size, (4, 6), generator=g)
    with torch.no_grad():
        encoded = model.encode(**inputs)
        expected = model(attention_mask=mask, decoder_input_ids=target, encoder_outputs=encoded)
    numpy = {k: v.numpy() for k, v in inputs.items()}
    hidden, *cross = exported.run(numpy, "encoder")
    real = mask.bool().numpy() if mask is not None else np.ones(hidden.shape[:2], dtype=bool)
    assert np.abs(hidden[real] - encoded.last_hidden_state.numpy()[real]).max() <= TOL
    # the decoder: 5 positions, then the 6th fed their cache
    names = exported.graph_names("decoder", "inputs")
    fixed = dict(zip([n for n in names if n.startswith("cross.")], cross, strict=True))
    if mask is not None:
        fixed["encoder_attention_mask"] = numpy["attention_mask"]
    cache = exported.manifest["cache"]
    empty = np.zeros((4, cache["kv_heads"], 0, cache["head_dim"]), dtype=np.float32)
    past = {n: empty for n in names if n.startswith("past_key_values.")}
    first, *present = exported.run({"decoder_input_ids": target[:, :5].numpy(), **fixed, **past}, "decoder")
    past = dict(zip(past, present, strict=True))
    last, *_ = exported.run({"decoder_input_ids": target[:, 5:].numpy(), **fixed, **past}, "decoder")
    want = expected.last_hidden_state.numpy()
    assert np.abs(want).max() > 0.01
    assert np.abs(np.concatenate([first, last], axis=1) - want).max() <= TOL


def test_generate_on_an_exported_seq2seq_folder_equals_the_torch_path(tmp_path, minilm, cli):
    folder = task_folder(tmp_path, minilm, transformers.AutoModelForSeq2SeqLM, family="bart")
    out = tmp_path / "out"
    cli("export", folder, out).ok()
    assert json.loads((out / MANIFEST).read_text())["task"] == "seq2seq"
    args = ["--prompt", "The capital of France is", "--prompt", "Once", "-n", "8", "--json"]
    want = [json.loads(line) for line in cli("generate", folder, *args).ok().stdout.splitlines()]
    assert [json.loads(line) for line in cli("generate", out, *args).ok().stdout.splitlines()] == want
    assert [
        json.loads(line) for line in cli("generate", out, *args, "--backend", "onnx").ok().stdout.splitlines()
    ] == want
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"text": "Once", "text_pair": "upon"}) + "\n")
    assert cli("predict", out, "--input", data).error_line() == (
        f"error: {out}: an exported seq2seq model generates with graft generate, not predict"
    )
    assert cli("eval", out, "--data", data).error_line() == (
        f"error: {out}: an exported seq2seq model generates with graft generate, not eval"
    )


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("exported-program", marks=pytest.mark.slow)])
def test_torch_formats_of_an_encoder_decoder_generate_graft_tokens(fmt, tmp_path):
    """The same two graphs as TorchScript / torch.export files, run through the runtime switch."""
    from graft.export.backend import load_exported

    lively("t5").save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf", task="seq2seq")
    manifest = export_model(model, tmp_path / "out", fmt=fmt)
    suffix = {"torchscript": ".pt", "exported-program": ".pt2"}[fmt]
    assert {g["file"] for g in manifest["graphs"].values()} == {"encoder" + suffix, "decoder" + suffix}
    inputs = source(model, "t5")
    expected = graft_tokens(model, inputs, 10, [])
    numpy = {k: v.numpy() for k, v in inputs.items()}
    assert load_exported(tmp_path / "out", "torchscript").generate_seq2seq(numpy, 10) == expected


def test_transcribe_on_an_exported_whisper_folder_equals_the_torch_path(tmp_path, cli):
    """graft transcribe on an exported tiny Whisper reading 30-second windows: the torch path's greedy
    tokens and text, with the token the model likes most suppressed (generation_config.json, copied by
    export) and a 40 s clip in two windows; export writes the feature extractor's settings the source
    folder lacks, so the folder needs nothing else."""
    import soundfile
    from test_ctranslate2 import tiny_whisper
    from test_whisper import converted

    from graft.export.backend import ExportedTranscriber, load_exported
    from graft.generation.speech import Transcriber
    from graft.speech import WhisperFeatures

    folder = converted(tmp_path, tiny_whisper(max_source_positions=1500, biases=False))
    model = load_model(folder)
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) * s for n, s in ((16000, 0.1), (640000, 0.5))]
    with torch.no_grad():
        favourite = (
            model(
                input_features=WhisperFeatures(n_mels=8)(clips),
                decoder_input_ids=torch.tensor([[21, 22, 25, 29]] * 2),
            )
            .logits[:, -1]
            .argmax(-1)
        )  # (2,)
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["suppress_tokens"] = [int(favourite[0])]
    (folder / "generation_config.json").write_text(json.dumps(generation))
    wavs = [tmp_path / f"{i}.wav" for i in range(len(clips))]
    for path, clip in zip(wavs, clips, strict=True):
        soundfile.write(path, clip, 16000, subtype="FLOAT")
    want = cli("transcribe", folder, *wavs, "--format", "jsonl").ok().stdout
    expected = Transcriber(model, folder).tokens(clips)
    data = tmp_path / "speech.csv"  # graft eval: the same transcripts, scored against these texts
    data.write_text("path,text\n" + "".join(f"{path},a b c\n" for path in wavs))
    scores = cli("eval", folder, "--data", data).ok().stdout

    (folder / "preprocessor_config.json").unlink()  # the torch path read it; the export must write it
    out = tmp_path / "out"
    cli("export", folder, out).ok()
    assert WhisperFeatures.from_folder(out) == WhisperFeatures(n_mels=8)
    assert json.loads((out / "generation_config.json").read_text()) == generation
    got = ExportedTranscriber(load_exported(out), out).tokens(clips)
    assert got == expected and [len(windows) for windows in got] == [1, 2]
    assert any(len(tokens) > 2 for windows in got for tokens in windows)  # not a bare end token
    assert all(generation["suppress_tokens"][0] not in tokens for windows in got for tokens in windows)
    assert cli("transcribe", out, *wavs, "--format", "jsonl").ok().stdout == want
    assert cli("transcribe", out, *wavs, "--format", "jsonl", "--backend", "onnx").ok().stdout == want
    assert cli("eval", out, "--data", data, "--backend", "onnx").ok().stdout == scores
    assert cli("transcribe", out, wavs[0], "--backend", "torchscript").error_line() == (
        f"error: --backend torchscript: {out} holds a onnx export (drop --backend to run it as exported)"
    )
    assert cli("transcribe", out, wavs[0], "--num-beams", "2").error_line() == (
        "error: --num-beams: an exported model generates greedily; run the model folder for that"
    )
