"""Training: pretraining, fine-tuning, metrics and hyper-parameter search."""
