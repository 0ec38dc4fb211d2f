"""Offline tools beside the daemon (training, evaluation, phantoms); the daemon never imports this package."""
