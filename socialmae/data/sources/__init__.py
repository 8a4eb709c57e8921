"""Dataset sources: each writes raw media plus a manifest under ``data/raw/<dataset>/``.

``catalog.SOURCES`` maps each ``data.datasets`` name to its params dataclass and prepare step.
"""
