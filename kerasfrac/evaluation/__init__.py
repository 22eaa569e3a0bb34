"""Evaluation: metrics, evaluate, the no-anatomy baseline audit, plots, the report table and
report.html (html.py).

TensorFlow-free to import; each module imports what it needs."""
