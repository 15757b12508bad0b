"""Training: registered datasets (load, deduplicate, split, hash), fine-tuning with evaluation on
held-out data, publishing the best checkpoint with its lineage, and gated promotion.

Below the edges: the CLI, the HTTP routes and the job workers call into it; it calls the registry,
the runtime and the engine layer (evaluation runs through the same path as serving).
"""
