"""Polar Sparsity building blocks: routers, selection, labels, calibration data, router training,
k search, router artifacts and calibration text. Pure torch/numpy; no distributed state.

routers    HeadRouter (d -> KV groups), NeuronRouter (d -> 1024 -> local MLP neurons)
selection  scores -> head tables (global / local scope) and the batch-union neuron index
labels     training labels from head output norms and fc1 pre-activations
buffer     SampleBuffer: bounded reservoir sample of (x, packed labels) per layer
training   train_router: weighted BCE, holdout, best epoch kept
search     neuron k per (layer, batch size); head k per layer under a density budget
artifact   routers.safetensors + metadata.json, checked on load
text       local calibration text, token segments, a leak-free train/held-out split
choice_tasks  multiple-choice items (JSONL) and a next-sentence task built from text
evaluate   teacher-forced NLL, perplexity and multiple-choice scores through a built runtime's decode
           steps (the one module here that runs the model)
"""
