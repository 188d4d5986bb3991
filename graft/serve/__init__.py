"""Serving (chapter 8): one loaded model behind an HTTP API, shared by every request.

- model.py: ``load_served``, whatever graft loads (folders, run folders, adapters + base, GGUF);
- batching.py: the token-budget queue that batches encoder requests;
- continuous.py: continuous batching of causal-LM requests over one running KV cache, and the
  prefix cache;
- completions.py: OpenAI's completions and chat completions on it (log-probabilities, n, streaming);
- metrics.py: Prometheus metrics;
- app.py: the FastAPI app (/v1/embeddings, /predict, /embed, /rerank, limits, the playground).

The command is ``graft serve MODEL`` (graft/cli/serve.py).
"""

from graft.serve.app import Settings, create_app
from graft.serve.model import Served, load_served

__all__ = ["Served", "Settings", "create_app", "load_served"]
