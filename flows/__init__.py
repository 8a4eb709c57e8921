"""Prefect flows over the DVC stages (pipeline.py, retrain.py) and their deployments."""
