"""Serving (chapter 8): one loaded model behind an HTTP API, shared by every request.

- model.py: ``load_served``, whatever graft loads (folders, run folders, adapters + base, GGUF,
  Whisper's CTranslate2 files);
- batching.py: the token-budget queue that batches encoder requests (and encoder-decoders',
  Whisper's windows, images);
- continuous.py: continuous batching of causal-LM requests over one running KV cache, and the
  prefix cache;
- completions.py: OpenAI's completions and chat completions on it (log-probabilities, n, streaming),
  and a seq2seq model's completions on the queue;
- tools.py: tool calls (named, required, and "auto" in the model family's own format);
- audio.py: OpenAI's speech to text (Whisper); images.py: images sent as data URIs;
- metrics.py: Prometheus metrics;
- app.py: the FastAPI app (/v1/embeddings, /predict, /embed, /rerank, limits, the playground).

The command is ``graft serve MODEL`` (graft/cli/serve.py).
"""

from graft.serve.app import Settings, create_app
from graft.serve.model import Served, load_served

__all__ = ["Served", "Settings", "create_app", "load_served"]
