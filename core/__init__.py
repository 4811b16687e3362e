"""The ground floor: errors, atomic file writes, hub loading, metrics and tensor helpers that both ``datamodules``
and ``lightning_modules`` stand on. Nothing here imports another package of the project."""
