"""Training entry points (`python -m train.distill`, ...) and the training loop."""
