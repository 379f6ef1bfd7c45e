"""Model I/O: input models and their headers (models.py), output shards (shards.py)."""
