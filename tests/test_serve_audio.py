"""``graft serve`` on whisper-base (the real CTranslate2 model.bin, served as it is): OpenAI's
/v1/audio/transcriptions and /v1/audio/translations take a multipart form as OpenAI's clients send
it, and give the text ``graft transcribe`` writes for the same file; concurrent uploads are decoded
together with the same texts; a field the server does not know or honour is a 422 naming it; the
playground transcribes a file chosen in a real browser. Speech from espeak-ng."""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_serve import Server

SENTENCES = ["Hello world. The weather in Paris is sunny today.", "Graft serves models over HTTP."]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.fail("apt-get install espeak-ng (part of the test setup: .ci/run installs it)")
    folder = tmp_path_factory.mktemp("speech")
    paths = []
    for i, sentence in enumerate(SENTENCES):
        path = folder / f"clip{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), sentence], check=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def whisper_server(whisper_base_ct2, tmp_path_factory):
    server = Server(whisper_base_ct2, log=tmp_path_factory.mktemp("logs") / "whisper.log")
    yield server
    server.close()


def upload(server, path, endpoint="transcriptions", **fields):
    with open(path, "rb") as f:
        files = {"file": (path.name, f, "audio/wav")}
        return server.client.post(f"/v1/audio/{endpoint}", files=files, data=fields)


@pytest.mark.slow  # whisper-base: 72.6M parameters
def test_transcriptions_give_graft_transcribes_text(whisper_server, whisper_base_ct2, clips, cli):
    expected = [cli("transcribe", whisper_base_ct2, clip).ok().stdout.strip() for clip in clips]
    assert all(expected)
    s = whisper_server
    assert s.client.get("/info").json()["task"] == "automatic-speech-recognition"
    got = [upload(s, clip, language="en").json()["text"] for clip in clips]
    assert got == expected
    assert upload(s, clips[0]).json()["text"] == expected[0]  # the language detected: English
    text = upload(s, clips[0], language="en", response_format="text")
    assert text.headers["content-type"].startswith("text/plain") and text.text == expected[0] + "\n"
    with ThreadPoolExecutor(4) as pool:  # decoded together on the queue: the same texts
        together = list(pool.map(lambda clip: upload(s, clip, language="en").json()["text"], clips * 2))
    assert together == expected * 2
    translated = upload(s, clips[0], "translations")
    assert translated.status_code == 200 and translated.json()["text"]


@pytest.mark.slow
def test_a_field_it_does_not_know_or_honour_is_a_422_that_names_it(whisper_server, clips, tmp_path):
    s = whisper_server
    for fields, param in (
        ({"prompt": "Earlier text."}, "prompt"),
        ({"colour": "red"}, "colour"),
        ({"response_format": "srt"}, "response_format"),
        ({"temperature": "0.4"}, "temperature"),
        ({"language": "xx"}, "language"),
    ):
        r = upload(s, clips[0], **fields)
        assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
    not_audio = tmp_path / "notes.txt"
    not_audio.write_text("not a sound")
    error = upload(s, not_audio).json()["error"]
    assert error["param"] == "file" and error["message"].startswith("file: notes.txt: not an audio file")
    assert "/tmp" not in error["message"]  # the upload's name, not the server's temporary file
    missing = s.client.post("/v1/audio/transcriptions", data={"language": "en"})
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "file"
    as_json = s.client.post("/v1/audio/transcriptions", json={"file": "x"})
    assert as_json.status_code == 422 and "multipart" in as_json.json()["error"]["message"]
    for path, body in (("/predict", {"inputs": "x"}), ("/embed", {"inputs": "x"})):
        r = s.client.post(path, json=body)
        assert r.status_code == 400 and "speech model" in r.json()["error"]["message"]


@pytest.mark.slow
def test_the_playground_transcribes_a_chosen_file(
    whisper_server, whisper_base_ct2, clips, cli, page, tmp_path
):
    expected = cli("transcribe", whisper_base_ct2, clips[1]).ok().stdout.strip()
    page.goto(whisper_server.url + "/")
    page.wait_for_selector("body[data-task=automatic-speech-recognition]")
    page.set_input_files("#file", str(clips[1]))
    page.click("#submit")
    page.wait_for_selector("#output[data-ready=true]")
    page.screenshot(path=str(tmp_path / "speech.png"))
    assert page.inner_text("#transcript") == expected


def test_a_text_model_has_no_audio_endpoints(tmp_path, minilm):
    server = Server(minilm, log=tmp_path / "serve.log")
    try:
        r = server.client.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF", "audio/wav")})
        assert r.status_code == 400 and "needs a Whisper model" in r.json()["error"]["message"]
    finally:
        server.close()
