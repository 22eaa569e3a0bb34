"""Evaluation: metrics, evaluate, the no-anatomy baseline audit, plots and the report table.

TensorFlow-free to import; each module imports what it needs."""
