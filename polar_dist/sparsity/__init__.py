"""Polar Sparsity building blocks: routers, selection, labels, calibration data, router training,
k search, router artifacts, calibration text, and the calibration that drives them. All but
`collect` and `calibrate` are pure torch/numpy with no distributed state; those two run the
model through the runtime on every rank.

routers    HeadRouter (d -> KV groups), NeuronRouter (d -> 1024 -> local MLP neurons)
selection  scores -> head tables (global / local scope) and the batch-union neuron index
labels     training labels from head output norms and fc1 pre-activations
buffer     SampleBuffer: bounded reservoir sample of (x, packed labels) per layer
training   train_router: weighted BCE, holdout, best epoch kept
search     neuron k per (layer, batch size); head k per layer under a density budget
artifact   routers.safetensors + metadata.json, checked on load
text       local calibration text, token segments, a leak-free train/held-out split
collect    router inputs and labels from dense prefill, through hooks on the model's taps
fit        train and measure each layer's routers, choose k, assemble the artifact
calibrate  CalibrationConfig and calibrate(): text -> collect -> fit -> artifact (launch/calibrate.py)
"""
