"""Find an official checkpoint's weight files and stream their tensors, strictly accounted for.

One responsibility: turn a model folder into ``(name, tensor)`` pairs without ever holding two copies
of the weights, and say precisely what is wrong when the folder does not match its ``config.json``.
The folder is only read, never written.

Layouts understood (the names Hugging Face uses, so a downloaded ``THUDM/chatglm2-6b`` works as is):
``model.safetensors``, ``model.safetensors.index.json`` + ``model-0000K-of-0000N.safetensors``,
``pytorch_model.bin``, ``pytorch_model.bin.index.json`` + ``pytorch_model-0000K-of-0000N.bin``.
Safetensors are preferred when a folder holds both kinds.
"""

from __future__ import annotations

import fnmatch
import json
import pickle
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .config import ModelConfig
from .errors import CheckpointNotFoundError, CorruptCheckpointError, WeightsMismatchError

__all__ = [
    "IGNORED_TENSORS",
    "WEIGHT_FILE_NAMES",
    "TensorAccount",
    "check_tensor",
    "find_weight_files",
    "is_ignored_tensor",
    "iter_tensors",
    "official_tensor_shapes",
]

# Buffers some checkpoints carry that glmrun derives itself. ChatGLM2's RotaryEmbedding registers
# inv_freq as a persistent buffer, so the official .bin shards hold it:
# https://huggingface.co/THUDM/chatglm2-6b/blob/main/modeling_chatglm.py (class RotaryEmbedding)
IGNORED_TENSORS: tuple[str, ...] = ("transformer.rotary_pos_emb.inv_freq",)

# Looked for in this order: single file before index, as transformers does, safetensors before .bin.
WEIGHT_FILE_NAMES: tuple[str, ...] = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

_MAX_LISTED = 10  # names shown per kind of problem in an error message


def official_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name glmrun loads for ``config``, with its shape, in checkpoint order."""
    h, v, f = config.hidden_size, config.padded_vocab_size, config.ffn_hidden_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.embedding.word_embeddings.weight": (v, h)}
    for i in range(config.num_layers):
        p = f"transformer.encoder.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        shapes[f"{p}.self_attention.query_key_value.weight"] = (config.qkv_size, h)
        if config.add_qkv_bias:
            shapes[f"{p}.self_attention.query_key_value.bias"] = (config.qkv_size,)
        shapes[f"{p}.self_attention.dense.weight"] = (h, config.num_attention_heads * config.head_dim)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        shapes[f"{p}.mlp.dense_h_to_4h.weight"] = (2 * f, h)  # gate rows, then up rows
        shapes[f"{p}.mlp.dense_4h_to_h.weight"] = (h, f)
    shapes["transformer.encoder.final_layernorm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["transformer.output_layer.weight"] = (v, h)
    return shapes


def is_ignored_tensor(name: str) -> bool:
    """Whether ``name`` matches one of :data:`IGNORED_TENSORS` (shell-style patterns allowed)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in IGNORED_TENSORS)


# Finding the files -------------------------------------------------------------------------------
def find_weight_files(folder: Path) -> list[Path]:
    """The weight files of ``folder`` in load order; raises if none, or if an index names a missing shard."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointNotFoundError(f"model folder {folder} does not exist or is not a folder")
    for name in WEIGHT_FILE_NAMES:
        path = folder / name
        if not path.is_file():
            continue
        return _read_index(path) if name.endswith(".index.json") else [path]
    raise CheckpointNotFoundError(
        f"no weights in {folder}: looked for {', '.join(WEIGHT_FILE_NAMES)}; download the whole model folder "
        "(config.json, tokenizer.model and every weight shard with its index)"
    )


def _read_index(index: Path) -> list[Path]:
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{index} is not valid JSON ({exc}); download it again") from exc
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CorruptCheckpointError(f'{index} has no "weight_map" object; download it again')
    shard_names = sorted(set(weight_map.values()), key=str)
    for shard in shard_names:
        # A weight_map names files beside the index; anything else could read outside the folder.
        if not isinstance(shard, str) or not shard or Path(shard).name != shard:
            raise CorruptCheckpointError(f"{index} lists {shard!r} as a shard, which is not a file name in its folder")
    missing = [s for s in shard_names if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointNotFoundError(
            f"{index} lists {len(missing)} shard(s) that are not in {index.parent}: {', '.join(missing)}; "
            "download the missing file(s)"
        )
    return [index.parent / s for s in shard_names]


# Streaming the tensors ---------------------------------------------------------------------------
def iter_tensors(
    folder: Path, *, progress: Callable[[int, int], None] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every ``(name, tensor)`` of the checkpoint in ``folder``, shard by shard, memory-mapped.

    Each shard is released before the next one is opened, so peak memory is what the caller keeps
    plus one tensor (safetensors) or one mmap-backed shard (.bin). ``progress(done_bytes, total_bytes)``
    is called after each shard, in file bytes. Ignored tensors (:data:`IGNORED_TENSORS`) are yielded
    too; :class:`TensorAccount` skips them.
    """
    files = find_weight_files(folder)
    total = sum(p.stat().st_size for p in files)
    done = 0
    seen: dict[str, Path] = {}
    for path in files:
        shard = _iter_safetensors(path) if path.suffix == ".safetensors" else _iter_bin(path)
        for name, tensor in shard:
            if name in seen:
                raise WeightsMismatchError(
                    f"tensor {name!r} is in both {seen[name].name} and {path.name} (in {path.parent}); "
                    "the shards come from different downloads: download the folder again"
                )
            seen[name] = path
            yield name, tensor
        done += path.stat().st_size
        if progress is not None:
            progress(done, total)


def _corrupt(path: Path, exc: BaseException) -> CorruptCheckpointError:
    detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    size = path.stat().st_size if path.exists() else 0
    return CorruptCheckpointError(
        f"{path} ({size:,} bytes) cannot be read: {detail}. The file is truncated or damaged (an interrupted "
        "download?): delete it and download it again"
    )


def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"{path} disappeared while loading; download it again") from exc
    except SafetensorError as exc:  # bad header, header too large, file shorter than its header says
        raise _corrupt(path, exc) from exc
    with handle:  # leaving the block unmaps the file
        for name in list(handle.keys()):
            try:
                tensor = handle.get_tensor(name)
            except SafetensorError as exc:
                raise _corrupt(path, exc) from exc
            yield name, tensor


# What torch.load raises on damaged files (checked on torch 2.x): RuntimeError from the zip reader
# ("failed finding central directory" when cut short), UnpicklingError/EOFError/UnicodeDecodeError
# from damaged pickle data. KeyError/IndexError cover archives missing a storage record.
_TORCH_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError)


def _load_bin(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as exc:
        if "mmap can only be used" not in str(exc):
            raise
    # Not a zip archive: either the legacy (pre-1.6) torch.save format, which cannot be mapped and is
    # read whole, or not a checkpoint at all, which the plain load reports.
    return torch.load(path, map_location="cpu", weights_only=True)


def _iter_bin(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state = _load_bin(path)
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"{path} disappeared while loading; download it again") from exc
    except _TORCH_LOAD_ERRORS as exc:
        raise _corrupt(path, exc) from exc
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in state.items()
    ):
        raise CorruptCheckpointError(
            f"{path} holds a {type(state).__name__}, not a dict of named tensors; it is not a model weight shard"
        )
    for name in list(state):
        yield name, state.pop(name)  # drop our reference as we go
    del state


# Accounting ----------------------------------------------------------------------------------------
def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def check_tensor(name: str, tensor: torch.Tensor, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raise :class:`WeightsMismatchError` at once if ``name`` is unexpected or has the wrong shape.

    Ignored tensors pass. Use :class:`TensorAccount` to collect every problem and report them together.
    """
    if is_ignored_tensor(name):
        return
    if name not in expected:
        raise WeightsMismatchError(f"unexpected tensor {name!r} {_shape_text(tuple(tensor.shape))}")
    found, want = tuple(tensor.shape), tuple(expected[name])
    if found != want:
        raise WeightsMismatchError(f"tensor {name!r} has shape {_shape_text(found)}, expected {_shape_text(want)}")


class TensorAccount:
    """Record the tensors a load has used; :meth:`finish` reports every missing, unexpected or misshaped one.

    ``add`` returns whether the caller should use the tensor, so a loader is one loop::

        account = TensorAccount(official_tensor_shapes(config), source=str(folder))
        for name, tensor in iter_tensors(folder):
            if account.add(name, tensor):
                ...  # place it
        account.finish()
    """

    def __init__(self, expected: Mapping[str, tuple[int, ...]], *, source: str = "the checkpoint") -> None:
        self.expected: dict[str, tuple[int, ...]] = {k: tuple(v) for k, v in expected.items()}
        self.source = source
        self.loaded: set[str] = set()
        self.ignored: list[str] = []
        self.unexpected: list[str] = []
        self.mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []  # name, expected, found

    def add(self, name: str, tensor: torch.Tensor) -> bool:
        """Account for one tensor; True when it is expected, new and of the expected shape."""
        if is_ignored_tensor(name):
            self.ignored.append(name)
            return False
        if name not in self.expected:
            self.unexpected.append(name)
            return False
        found = tuple(tensor.shape)
        if found != self.expected[name]:
            self.mismatched.append((name, self.expected[name], found))
            return False
        if name in self.loaded:
            raise WeightsMismatchError(f"tensor {name!r} appears twice in {self.source}; download the folder again")
        self.loaded.add(name)
        return True

    @property
    def missing(self) -> list[str]:
        """Expected names not loaded (misshaped ones excluded: they are reported as mismatches)."""
        bad = {m[0] for m in self.mismatched}
        return [n for n in self.expected if n not in self.loaded and n not in bad]

    def finish(self) -> None:
        """Raise :class:`WeightsMismatchError` naming the problems (first 10 of each kind), if any."""
        parts = []
        missing = self.missing
        if missing:
            parts.append(_listing(f"{len(missing)} missing", missing))
        if self.unexpected:
            parts.append(_listing(f"{len(self.unexpected)} unexpected", self.unexpected))
        if self.mismatched:
            shown = [f"{n} (expected {_shape_text(e)}, found {_shape_text(f)})" for n, e, f in self.mismatched]
            parts.append(_listing(f"{len(self.mismatched)} wrongly shaped", shown))
        if parts:
            raise WeightsMismatchError(
                f"the tensors in {self.source} do not match its config.json: " + "; ".join(parts) + ". The weights "
                "belong to another model or the download is incomplete: download the whole folder again"
            )


def _listing(title: str, items: list[str]) -> str:
    text = f"{title}: " + ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        text += f", ... and {len(items) - _MAX_LISTED} more"
    return text
