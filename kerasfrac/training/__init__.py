"""Training: the task and its step, checkpoints, distribution strategies, CPU kernels.

TensorFlow-free to import; each module imports what it needs."""
