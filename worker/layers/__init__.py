"""Model layers, written tensor-parallel from the start (world size 1 until TP is on)."""
