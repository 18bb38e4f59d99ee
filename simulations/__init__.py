"""Runnable experiments on top of the app (many virtual clients through Flower's simulation engine)."""
