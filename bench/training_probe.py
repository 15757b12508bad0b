"""Scratch probe: which MiniLM fine-tune settings reach the BBC target within 30 minutes on 2 cores.

    python bench/training_probe.py --time-steps 4 --max-length 128      # CPU seconds per step
    python bench/training_probe.py --epochs 3 --lr 1e-4 --max-length 128  # one full run

Standalone (transformers Trainer straight on the demo MiniLM folder, read-only) so it runs before
moorage's trainer exists. BBC is deduplicated (exact, then lower-cased whitespace-collapsed text)
and split stratified with seed 0: test 0.2, validation 0.1 of the deduplicated rows.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time

import numpy as np


def dedupe(rows):
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = re.sub(r"\s+", " ", row["text"]).strip().lower()
        if key in seen:
            continue
        seen.add(key)
        kept.append(row)
    return kept


def split(rows, seed=0):
    from sklearn.model_selection import train_test_split

    labels = [r["label"] for r in rows]
    rest, test = train_test_split(rows, test_size=0.2, stratify=labels, random_state=seed)
    val_share = 0.1 / 0.8
    train, val = train_test_split(rest, test_size=val_share, stratify=[r["label"] for r in rest], random_state=seed)
    return train, val, test


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--bs", type=int, default=16)
    p.add_argument("--warmup", type=float, default=0.0)
    p.add_argument("--wd", type=float, default=0.01)
    p.add_argument("--scheduler", default="linear")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--time-steps", type=int, default=0, help="only time this many steps")
    args = p.parse_args()

    import torch
    import transformers
    from sklearn.metrics import accuracy_score, f1_score

    from moorage.demo import assets

    torch.set_num_threads(args.threads)
    rows = dedupe(assets.bbc_news())
    train, val, test = split(rows)
    labels = sorted({r["label"] for r in rows})
    label_id = {name: i for i, name in enumerate(labels)}
    print(f"rows {len(rows)} train {len(train)} val {len(val)} test {len(test)}", flush=True)

    folder = str(assets.minilm_folder())
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    transformers.set_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label_id
    )

    class DS(torch.utils.data.Dataset):
        def __init__(self, items):
            self.enc = tok([r["text"] for r in items], truncation=True, max_length=args.max_length)
            self.y = [label_id[r["label"]] for r in items]

        def __len__(self):
            return len(self.y)

        def __getitem__(self, i):
            d = {k: v[i] for k, v in self.enc.items()}
            d["labels"] = self.y[i]
            return d

    def metrics(pred):
        y = pred.label_ids
        yhat = np.argmax(pred.predictions, axis=-1)
        return {"accuracy": accuracy_score(y, yhat), "macro_f1": f1_score(y, yhat, average="macro")}

    work = tempfile.mkdtemp(prefix="probe-")
    targs = transformers.TrainingArguments(
        output_dir=work,
        use_cpu=True,
        per_device_train_batch_size=args.bs,
        per_device_eval_batch_size=64,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.time_steps or -1,
        weight_decay=args.wd,
        warmup_steps=args.warmup,
        lr_scheduler_type=args.scheduler,
        eval_strategy="no" if args.time_steps else "epoch",
        save_strategy="no",
        logging_steps=10,
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model,
        args=targs,
        train_dataset=DS(train),
        eval_dataset={"val": DS(val), "test": DS(test)},
        data_collator=transformers.DataCollatorWithPadding(tok),
        compute_metrics=metrics,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    steps = trainer.state.global_step
    out = {"args": vars(args), "steps": steps, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
    out["cpu_s_per_step"] = round(cpu / max(steps, 1), 2)
    if not args.time_steps:
        out["history"] = [h for h in trainer.state.log_history if "eval_val_accuracy" in h or "eval_test_accuracy" in h]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
