"""The step channel from rank 0 to ranks 1..tp-1: a fixed-size int64 header broadcast on a CPU
(gloo) control group, then one flat int64 payload holding every StepInputs tensor broadcast on the
data group (NCCL on CUDA, so the payload never leaves the GPUs; gloo on CPU).

Nothing is pickled: receivers allocate the payload from the header's sizes and split it back into
tensors. Two broadcasts per step whatever the batch."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum

import torch
import torch.distributed as dist

from shardline.worker.engine.model_runner import StepInputs

HEADER_LEN = 9
# header slots: command, step index, num_tokens T, num_seqs S, block table width B, sample rows N,
# extra KV-cache groups X (hybrid models; 0 otherwise), their block table width BX, and whether the
# step holds prompt rows P (StepInputs.has_prompt_rows)
_CMD, _STEP, _T, _S, _B, _N, _X, _BX, _P = range(9)


class Command(IntEnum):
    """What rank 0 asks of the other ranks."""

    STEP = 1  # run one forward on the StepInputs that follow
    SHUTDOWN = 2  # leave the loop, destroy the process group, exit
    REPORT = 3  # all-gather each rank's parameter counts (tests, diagnostics)


@dataclass(frozen=True)
class Message:
    """One received header and, for STEP, its inputs."""

    command: Command
    step: int
    inputs: StepInputs | None = None


def _layout(t: int, s: int, b: int, n: int, x: int = 0, bx: int = 0) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each StepInputs field, in StepInputs.tensors() order."""
    layout = [
        ((t,), torch.int64),  # input_ids
        ((t,), torch.int64),  # positions
        ((t,), torch.int64),  # slot_mapping
        ((s + 1,), torch.int32),  # query_start_loc
        ((s,), torch.int32),  # seq_lens
        ((s, b), torch.int32),  # block_tables
        ((n,), torch.int64),  # sample_rows
    ]
    if x:
        layout += [((x, t), torch.int64), ((x, s, bx), torch.int32)]  # group_slot_mapping, group_block_tables
    return layout


def payload_bytes(num_tokens: int, num_seqs: int, table_width: int, num_sample_rows: int,
                  num_extra_groups: int = 0, group_table_width: int = 0) -> int:
    """Bytes of one step's payload (header not included: HEADER_LEN * 8 bytes)."""
    extra = num_extra_groups * (num_tokens + num_seqs * group_table_width)
    return 8 * (3 * num_tokens + 2 * num_seqs + 1 + num_seqs * table_width + num_sample_rows + extra)


def pack(inputs: StepInputs) -> tuple[list[int], torch.Tensor]:
    """([T, S, B, N, X, BX], one flat int64 tensor on the inputs' device)."""
    t = inputs.input_ids.shape[0]
    s = inputs.seq_lens.shape[0]
    b = inputs.block_tables.shape[1] if inputs.block_tables.dim() == 2 else 0
    n = inputs.sample_rows.shape[0]
    groups = group_width = 0
    if inputs.group_block_tables is not None:
        groups, group_width = inputs.group_block_tables.shape[0], inputs.group_block_tables.shape[2]
    tensors = inputs.tensors()
    layout = _layout(t, s, b, n, groups, group_width)
    if len(tensors) != len(layout):
        raise TypeError(f"StepInputs has {len(tensors)} tensors, the channel layout {len(layout)}: update channel._layout")
    for i, (x, (shape, _)) in enumerate(zip(tensors, layout)):
        if tuple(x.shape) != shape:
            raise ValueError(f"StepInputs tensor {i}: shape {tuple(x.shape)}, expected {shape}")
    flat = torch.cat([x.reshape(-1).to(torch.int64) for x in tensors])
    return [t, s, b, n, groups, group_width], flat


def unpack(sizes: list[int], flat: torch.Tensor) -> StepInputs:
    """The inverse of pack (views into `flat`, recast where the field is int32)."""
    layout = _layout(*sizes)
    parts = flat.split([_numel(shape) for shape, _ in layout])
    tensors = [p.reshape(shape).to(dtype) for p, (shape, dtype) in zip(parts, layout)]
    return StepInputs(*tensors)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class StepChannel:
    """Rank 0 calls send(); every other rank calls recv() in a loop. Both sides must be built on
    the same two groups; `device` is where payloads live (the rank's GPU, or cpu)."""

    def __init__(self, control_group: dist.ProcessGroup, data_group: dist.ProcessGroup, device: torch.device) -> None:
        self.control_group = control_group
        self.data_group = data_group
        self.device = device
        self._header = torch.zeros(HEADER_LEN, dtype=torch.int64)

    def send(self, command: Command, step: int = 0, inputs: StepInputs | None = None) -> None:
        """Broadcast a command (rank 0); STEP carries `inputs`."""
        header = self._header
        header.zero_()
        header[_CMD] = int(command)
        header[_STEP] = step
        flat = None
        if command == Command.STEP:
            if inputs is None:
                raise ValueError("a STEP command needs its StepInputs")
            sizes, flat = pack(inputs)
            header[_T : _BX + 1] = torch.tensor(sizes)
            header[_P] = int(inputs.has_prompt_rows)
        dist.broadcast(header, src=0, group=self.control_group)
        if flat is not None:
            dist.broadcast(flat.to(self.device), src=0, group=self.data_group)

    def recv(self) -> Message:
        """Wait for rank 0's next command (ranks 1..tp-1)."""
        header = self._header
        dist.broadcast(header, src=0, group=self.control_group)
        values = header.tolist()
        command = Command(values[_CMD])
        if command != Command.STEP:
            return Message(command, values[_STEP])
        sizes = values[_T : _BX + 1]
        flat = torch.empty(payload_bytes(*sizes) // 8, dtype=torch.int64, device=self.device)
        dist.broadcast(flat, src=0, group=self.data_group)
        inputs = dataclasses.replace(unpack(sizes, flat), has_prompt_rows=bool(values[_P]))
        return Message(command, values[_STEP], inputs)
