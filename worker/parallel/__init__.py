"""Tensor parallelism: process groups, collectives and the rank launcher."""
