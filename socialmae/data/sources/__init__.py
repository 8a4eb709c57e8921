"""Dataset sources: each writes raw media plus a manifest under ``data/raw/<dataset>/``."""
