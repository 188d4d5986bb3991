"""Retrieval-augmented generation (chapter 10): index a corpus, retrieve, answer with cited sources.

from graft.rag import Embedder, build, read_corpus, retrieve, messages
embedder = Embedder("sentence-transformers/all-MiniLM-L6-v2")
documents, _ = read_corpus([Path("docs")])
index = build(embedder, documents, size=200, overlap=40)
hits = retrieve(index, embedder, "Who wrote it?", k=4)
chat = messages("Who wrote it?", hits)   # for the chat model's template
"""

from graft.rag.answer import Question, Reranker, evaluate, messages, read_questions, retrieve
from graft.rag.corpus import Chunk, Document, chunk, read_corpus, spans
from graft.rag.index import Embedder, Hit, Index, build, load

__all__ = [
    "Chunk",
    "Document",
    "Embedder",
    "Hit",
    "Index",
    "Question",
    "Reranker",
    "build",
    "chunk",
    "evaluate",
    "load",
    "messages",
    "read_corpus",
    "read_questions",
    "retrieve",
    "spans",
]
