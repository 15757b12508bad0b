"""The baseline (c) of bench/serving.py: a hand-written FastAPI embedding service.

One request at a time: the endpoint calls the model directly, with one sentence per call, the way a
quick in-house service is usually written. Run: python bench/naive_server.py FOLDER PORT
"""

import sys

import uvicorn
from fastapi import FastAPI
from sentence_transformers import SentenceTransformer

model = SentenceTransformer(sys.argv[1], device="cpu", local_files_only=True)
app = FastAPI()


@app.post("/v1/embeddings")
async def embeddings(body: dict) -> dict:
    vector = model.encode([body["input"]])[0]
    return {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": vector.tolist()}]}


@app.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
