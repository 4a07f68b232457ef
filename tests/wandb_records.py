"""A reader of W&B's offline `.wandb` files for tests (wandb ships no Python reader)."""

import struct
from pathlib import Path


def wandb_records(path):
    """Records of a .wandb file: W&B's LevelDB-style log (7-byte file header, 32 KiB blocks,
    records of crc32 + length + type, split across blocks as FIRST/MIDDLE/LAST) holding
    W&B's own protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:  # zero padding
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record
