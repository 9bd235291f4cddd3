"""The run directory: its layout, atomic writes, the one-training lock, lineage and events."""
