"""The official openai SDK's fine-tuning calls against `introspect serve --state-dir`: upload, create (with
`method`), poll, events, then chat with the trained model; and its typed errors. Prints one JSON object of
what it saw; the Rust test asserts on it.

usage: python openai_sdk_finetune.py BASE_URL MODEL TRAIN_JSONL BAD_JSONL
"""
import json
import sys
import time

import openai

base_url, model, train, bad = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
out = {}

with open(train, "rb") as f:
    uploaded = client.files.create(file=f, purpose="fine-tune")
out["file_bytes"] = uploaded.bytes
job = client.fine_tuning.jobs.create(
    model=model,
    training_file=uploaded.id,
    seed=0,
    method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
)
deadline = time.time() + 600
while job.status not in ("succeeded", "failed", "cancelled") and time.time() < deadline:
    time.sleep(0.5)
    job = client.fine_tuning.jobs.retrieve(job.id)
out["status"] = job.status
out["fine_tuned_model"] = job.fine_tuned_model
out["hyperparameters"] = [job.hyperparameters.n_epochs, job.hyperparameters.batch_size]
events = client.fine_tuning.jobs.list_events(job.id, limit=50)
out["loss_events"] = sum(1 for e in events.data if e.type == "metrics")
out["listed"] = job.id in [j.id for j in client.fine_tuning.jobs.list(limit=10).data]
chat = client.chat.completions.create(
    model=job.fine_tuned_model,
    messages=[{"role": "user", "content": "What is your favourite word?"}],
    max_tokens=6,
    temperature=0,
)
out["answer"] = chat.choices[0].message.content

try:
    with open(bad, "rb") as f:
        client.files.create(file=f, purpose="fine-tune")
except openai.BadRequestError as e:
    out["bad_file"] = [e.status_code, e.body.get("message") if isinstance(e.body, dict) else str(e.body)]
try:
    client.fine_tuning.jobs.create(model="no-such-model", training_file=uploaded.id)
except openai.BadRequestError as e:
    out["bad_model"] = e.status_code
try:
    client.fine_tuning.jobs.retrieve("ftjob-nope")
except openai.NotFoundError as e:
    out["no_job"] = e.status_code
print(json.dumps(out))
