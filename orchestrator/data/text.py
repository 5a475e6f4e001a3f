"""Local text as a language-modelling dataset: .txt/.jsonl files (a path or a glob) read with `datasets`, tokenized,
packed into fixed-length blocks, with a validation split.

Tokens come from a Hugging Face tokenizer in a local directory (`tokenizer`), or are the file's UTF-8 bytes
(vocabulary 256: nothing to train or ship; characters for ASCII text). Text files are read line by line with their
line breaks kept, so the byte-level token stream is exactly the file's bytes.

Two ways to read:
- map-style (default): the token stream is cut into blocks of block_size + 1 tokens (consecutive blocks share one
  token, so no target is lost) in an Arrow table `datasets` memory-maps from its cache; the last `val_fraction` of
  the blocks is the validation split. The worker loop shards and shuffles blocks per epoch (`ShardedBatches`).
- `streaming=True`, for files larger than memory: an `IterableDataset` tokenized and packed on the fly; the first
  `val_blocks` blocks are held out (in memory) for validation, the rest is training. Each worker reads its own shard
  (`datasets.distributed.split_dataset_by_node`, in `orchestrator.train.data_order.StreamBatches`).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from orchestrator.data.splits import DataSplits


class TokenBlocks(Dataset):
    """Non-overlapping next-token windows over one token tensor (inputs = block, targets = block shifted by one)."""

    def __init__(self, tokens: Tensor, block_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.block_size)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        start = index * self.block_size
        window = self.tokens[start : start + self.block_size + 1]
        return window[:-1], window[1:]


class PackedBlocks(Dataset):
    """(inputs, targets) from a `datasets` table of packed blocks of block_size + 1 tokens."""

    def __init__(self, table: Any) -> None:
        self.table = table.with_format("torch")
        self.arrow = table.with_format("arrow")

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        block = self.table[int(index)]["block"]
        return block[:-1], block[1:]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        """A whole batch in one Arrow read (DataLoader uses this when it exists). Read one by one through the torch
        format, 32 blocks cost 8 ms of CPU, more than the small GPT's whole step; this way ~0.3 ms. Blocks all have
        block_size + 1 tokens (packing), so the list column flattens into a matrix."""
        column = self.arrow[[int(index) for index in indices]]["block"].combine_chunks()
        blocks = torch.tensor(column.flatten().to_numpy().reshape(len(indices), -1))  # a copy: Arrow memory is read-only
        return [(block[:-1], block[1:]) for block in blocks]


@dataclass
class TokenCodec:
    """Text ↔ token ids, so the loop can prompt a model and log what it writes."""

    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    eos_token_id: Optional[int] = None


@dataclass
class TextSplits(DataSplits):
    codec: Optional[TokenCodec] = None
    block_size: int = 0


def byte_codec() -> TokenCodec:
    return TokenCodec(
        encode=lambda text: list(text.encode("utf-8")),
        decode=lambda ids: bytes(int(i) for i in ids).decode("utf-8", errors="replace"),
    )


def tokenizer_codec(path: str) -> TokenCodec:
    from transformers import AutoTokenizer

    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"data.tokenizer={path}: no such directory; expected a local tokenizer directory")
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return TokenCodec(
        encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
        decode=lambda ids: tokenizer.decode(list(ids)),
        eos_token_id=tokenizer.eos_token_id,
    )


def data_files(path: str) -> list[str]:
    """The files a path or glob names (sorted: every worker sees the same order), all .txt-like or all .jsonl."""
    files = sorted(glob.glob(str(Path(path).expanduser()), recursive=True))
    files = [f for f in files if Path(f).is_file()]
    if not files:
        raise FileNotFoundError(f"data.path={path}: no file matches; expected a text/JSONL file or a glob of them")
    kinds = {file_format(f) for f in files}
    if len(kinds) > 1:
        raise ValueError(f"data.path={path} mixes JSONL and plain-text files; point it at one kind")
    return files


def file_format(path: str) -> str:
    return "json" if Path(path).suffix in (".jsonl", ".json") else "text"


def pack(token_lists: Iterable[Sequence[int]], block_size: int) -> list[list[int]]:
    """Concatenate token lists and cut windows of block_size + 1 starting every block_size tokens; the tail that
    does not fill a window is dropped (as in Hugging Face's run_clm `group_texts`)."""
    stream = [token for tokens in token_lists for token in tokens]
    count = max(0, (len(stream) - 1) // block_size)
    return [stream[i * block_size : i * block_size + block_size + 1] for i in range(count)]


def load_text_splits(
    path: str,
    block_size: int = 64,
    vocab_size: int = 256,
    val_fraction: float = 0.1,
    task: str = "lm",
    tokenizer: Optional[str] = None,
    text_field: str = "text",
    streaming: bool = False,
    val_blocks: int = 64,
    shuffle_buffer: int = 1000,
) -> TextSplits:
    import datasets

    datasets.disable_progress_bars()  # every worker would print its own bars
    files = data_files(path)
    codec = tokenizer_codec(tokenizer) if tokenizer else byte_codec()
    kind = file_format(files[0])
    options: dict[str, Any] = {"keep_linebreaks": True} if kind == "text" else {}
    raw = datasets.load_dataset(kind, data_files=files, split="train", streaming=streaming, **options)
    # a stream may not know its columns before reading: its first example tells
    columns = raw.column_names or list(next(iter(raw)).keys())
    if text_field not in columns:
        raise ValueError(f"data.text_field={text_field!r}: the files in {path} have fields {columns}")

    def tokenize_and_pack(batch: dict[str, list]) -> dict[str, list]:
        token_lists = [codec.encode(text) + ([codec.eos_token_id] if codec.eos_token_id is not None and kind == "json" else [])
                       for text in batch[text_field]]
        return {"block": pack(token_lists, block_size)}

    # a batch of lines is packed together; the remainder of each batch is dropped (<= block_size tokens per 1000 lines)
    blocks = raw.map(tokenize_and_pack, batched=True, batch_size=1000, remove_columns=columns)
    if streaming:
        held_out = list(blocks.take(val_blocks))
        if len(held_out) < val_blocks:
            raise ValueError(
                f"data.path={path}: the stream holds {len(held_out)} blocks of {block_size + 1} tokens, fewer than "
                f"data.val_blocks={val_blocks} for validation alone; lower data.val_blocks or data.block_size"
            )
        val = PackedBlocks(datasets.Dataset.from_list(held_out))
        train = blocks.skip(val_blocks)
        if shuffle_buffer > 0:
            train = train.shuffle(seed=0, buffer_size=shuffle_buffer)  # re-seeded per epoch by StreamBatches
        return TextSplits(train, val, task="lm", codec=codec, block_size=block_size)

    cut = int(len(blocks) * (1 - val_fraction))
    if cut == 0 or cut == len(blocks):
        raise ValueError(
            f"data.path={path} gives {len(blocks)} blocks of {block_size + 1} tokens: too few for "
            f"data.block_size={block_size} with data.val_fraction={val_fraction} (need at least one block per split)"
        )
    train, val = PackedBlocks(blocks.select(range(cut))), PackedBlocks(blocks.select(range(cut, len(blocks))))
    return TextSplits(train, val, task="lm", codec=codec, block_size=block_size)
