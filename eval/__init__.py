"""Command-line evaluations: `python -m eval.perplexity`, `eval.generate`, `eval.bench_decode`."""
