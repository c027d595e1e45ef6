"""Polar Sparsity building blocks: routers, selection, labels, calibration data, router training,
k search, router artifacts, calibration text, and the calibration that drives them. All but
`collect`, `calibrate` and `evaluate` are pure torch/numpy with no distributed state; those run
the model through the runtime.

routers    HeadRouter (d -> KV groups), NeuronRouter (d -> 1024 -> local MLP neurons)
selection  scores -> head tables (global / local scope) and the batch-union neuron index
labels     training labels from head output norms and fc1 pre-activations
buffer     SampleBuffer: bounded reservoir sample of (x, packed labels) per layer
training   train_router: weighted BCE, holdout, best epoch kept
search     neuron k per (layer, batch size); head k per layer under a density budget
artifact   routers.safetensors + metadata.json, checked on load
text       local calibration text, token segments, a leak-free train/held-out split
policy     SparsityPolicy: per-layer head k and neuron k tables from config + artifact
collect    router inputs and labels from dense prefill, through hooks on the model's taps
fit        train and measure each layer's routers, choose k, assemble the artifact
calibrate  CalibrationConfig and calibrate(): text -> collect -> fit -> artifact (launch/calibrate.py)
choice_tasks  multiple-choice items (JSONL) and a next-sentence task built from text
evaluate   teacher-forced NLL, perplexity and multiple-choice scores through a built runtime's decode
           steps
"""
