"""Collects a layer's pieces while weights stream in (fused layers receive q, k, v or gate, up one at
a time, possibly of different GGUF types), then builds the layer's QuantMethod once."""

from __future__ import annotations

import torch

from .base import LoadedPiece, QuantMethod
from .group_quantized import GroupQuantized


class QuantizedWeightStager:
    """Pieces of one rank's weight [rows, cols] keyed by their first row."""

    def __init__(self, rows: int, cols: int) -> None:
        self.rows, self.cols = rows, cols
        self.pieces: dict[int, LoadedPiece] = {}

    def add(self, row_offset: int, piece: LoadedPiece, name: str) -> None:
        """Stage rows [row_offset, row_offset + len(piece)); raises ValueError naming the weight when
        the piece's shape does not fit."""
        shape = tuple(piece.shape)
        if len(shape) != 2 or shape[1] != self.cols or row_offset + shape[0] > self.rows:
            raise ValueError(f"weight {name}: expected rows of {self.cols} features within {self.rows} rows, "
                             f"checkpoint has {shape} at row {row_offset}")
        self.pieces[row_offset] = piece

    def ordered(self, pad_rows_to: int | None = None) -> list[LoadedPiece]:
        """The pieces in row order; with pad_rows_to, zero rows appended up to that count (a padded
        vocabulary), in the last piece's own form so a quantized tensor stays quantized."""
        out = [self.pieces[k] for k in sorted(self.pieces)]
        covered = sum(int(p.shape[0]) for p in out)
        if pad_rows_to is not None and covered < pad_rows_to and out:
            out.append(_zero_rows(out[-1], pad_rows_to - covered))
        return out

    def build(self, build_fn, pad_rows_to: int | None = None) -> QuantMethod:
        return build_fn(self.ordered(pad_rows_to))


def _zero_rows(like: LoadedPiece, rows: int) -> LoadedPiece:
    if isinstance(like, GroupQuantized):
        return like.map_rows(lambda t: torch.zeros((rows,) + tuple(t.shape[1:]), dtype=t.dtype))
    return torch.zeros(rows, like.shape[1], dtype=like.dtype)
