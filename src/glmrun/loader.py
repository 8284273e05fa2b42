"""From a path to a ready model: resolve the checkpoint, build on ``meta``, stream weights into place.

Weights arrive one tensor at a time (mmap'd shards, or dequantized GGUF tensors), are cast to the
chosen dtype and moved straight to the device their layer was planned on, so the CPU never holds a
second copy of the model. Every expected tensor must arrive exactly once with its official shape.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .chat_format import detect_chatglm_format
from .config import ModelConfig, QuantSpec, load_chatglm_config
from .cpu_linear import HalfPacked, half_weights_for, half_weights_supported
from .errors import CheckpointNotFoundError, DeviceError, InvalidArgumentError
from .model import ChatGLMForCausalLM
from .tokenizer import ChatGLMTokenizer, GGUFTokenizer, Tokenizer
from .weights import TensorAccount, iter_tensors, official_tensor_shapes

__all__ = ["Checkpoint", "resolve_checkpoint", "parse_device", "parse_dtype", "load_model", "DEFAULT_MODEL_ENV"]

DEFAULT_MODEL_ENV = "GLMRUN_MODEL"

_DTYPE_NAMES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


@dataclass(frozen=True)
class Checkpoint:
    """Where a model comes from and what kind it is."""

    path: Path
    kind: str  # "chatglm" (official folder) or "gguf"
    embedded: bool = False

    @property
    def model_id(self) -> str:
        return self.path.stem if self.kind == "gguf" else self.path.name


def default_group_size(ckpt: Checkpoint) -> int:
    """The group size ``--quantize int8|int4`` uses for ``ckpt`` (see :func:`glmrun.quant.fitting_group_size`).

    A GGUF file's block width, without parsing the file (its quantized tensors' rows are whole blocks);
    for a folder, 128 or the largest power of two below it that its layer widths allow.
    """
    from .quant import GGUF_BLOCK, fitting_group_size

    if ckpt.kind == "gguf":
        return GGUF_BLOCK
    return fitting_group_size(load_chatglm_config(ckpt.path))


def resolve_checkpoint(path: str | os.PathLike[str] | None) -> Checkpoint:
    """An explicit path, else $GLMRUN_MODEL, else the embedded SmolLM2 GGUF."""
    embedded = False
    if path is None or str(path) == "":
        env = os.environ.get(DEFAULT_MODEL_ENV)
        if env:
            path = env
        else:
            from .gguf_meta import embedded_gguf_path

            path, embedded = embedded_gguf_path(), True
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointNotFoundError(
            f"model path {p} does not exist: pass a ChatGLM2-6B folder (with config.json, the weight shards and "
            "tokenizer.model) or a .gguf file"
        )
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise CheckpointNotFoundError(
                f"{p} is a file but not a .gguf: pass the folder that holds config.json and the weight shards"
            )
        return Checkpoint(p, "gguf", embedded)
    if (p / "config.json").is_file():
        return Checkpoint(p, "chatglm", embedded)
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return Checkpoint(ggufs[0], "gguf", embedded)
    raise CheckpointNotFoundError(
        f"{p} holds no config.json (nor a single .gguf file): point at the downloaded ChatGLM2-6B folder itself"
    )


def parse_device(device: str | torch.device | None) -> torch.device:
    if isinstance(device, torch.device):
        text = str(device)
    else:
        text = (device or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise DeviceError(f"unknown device {text!r}: use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceError(f"device type {dev.type!r} is not supported: use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {text!r} was asked for but this torch sees no CUDA GPU (torch {torch.__version__}); "
            "use --device cpu, or install a CUDA build of torch"
        )
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise DeviceError(f"device cuda:{index} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return torch.device("cuda", index)


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device, config: ModelConfig) -> torch.dtype:
    """None picks the checkpoint's dtype on a GPU; on the CPU float16 where fbgemm multiplies float16
    matrices in float32 (x86: half the bytes per token, see glmrun.cpu_linear), else float32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPE_NAMES.values():
            raise InvalidArgumentError(f"dtype {dtype} is not supported: use float16, bfloat16 or float32")
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cpu":
            return torch.float16 if half_weights_supported() else torch.float32
        return _DTYPE_NAMES[config.torch_dtype]
    try:
        return _DTYPE_NAMES[dtype.strip().lower()]
    except KeyError:
        raise InvalidArgumentError(f"unknown dtype {dtype!r}: use float16, bfloat16 or float32") from None


@contextmanager
def _progress_bar(label: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on a terminal; nothing when stderr is not one."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    bar_columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*bar_columns, transient=True, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _target(model: nn.Module, name: str) -> tuple[nn.Module, str, bool]:
    """The module owning tensor ``name``, the attribute, and whether it is a buffer (quantized data)."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    return module, attr, attr in module._buffers


def _set_tensor(module: nn.Module, attr: str, is_buffer: bool, value: torch.Tensor) -> None:
    if is_buffer:
        module._buffers[attr] = value
    else:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)


def _layer_of(name: str) -> int | None:
    prefix = "transformer.encoder.layers."
    if name.startswith(prefix):
        return int(name[len(prefix) :].split(".", 1)[0])
    return None


def load_model(
    ckpt: Checkpoint,
    *,
    dtype: str | torch.dtype | None,
    device: str | torch.device | None,
    quantize: QuantSpec | None = None,
    layer_devices: list[torch.device] | None = None,
    progress: bool = True,
) -> tuple[ChatGLMForCausalLM, Tokenizer]:
    """Build the model on ``meta`` and stream the checkpoint's tensors into place."""
    reader = None
    if ckpt.kind == "gguf":
        from .gguf_file import gguf_config
        from .gguf_meta import open_gguf, read_gguf_metadata

        reader = open_gguf(ckpt.path)  # parsed once: metadata, config and tensors all come from it
        meta = read_gguf_metadata(reader)
        config = gguf_config(meta, source=str(ckpt.path), tensor_names=[t.name for t in reader.tensors])
        tokenizer: Tokenizer = GGUFTokenizer.from_metadata(meta)
    else:
        config = load_chatglm_config(ckpt.path)
        tok_path = ckpt.path / "tokenizer.model"
        tokenizer = ChatGLMTokenizer.from_file(tok_path, chat_format=detect_chatglm_format(ckpt.path))
    dev = parse_device(device)
    torch_dtype = parse_dtype(dtype, dev, config)
    # float16 on the CPU: float16 matrices multiplied in float32 by fbgemm (half-precision CPU arithmetic is
    # slow and loses accuracy); the model is built and loaded in float32, its linear layers then converted.
    cpu_half = half_weights_for(dev, torch_dtype)
    if cpu_half:
        torch_dtype = torch.float32
    saved_quant = config.quantization
    quant = quantize or saved_quant
    if layer_devices is None:
        layer_devices = [dev] * config.num_layers
    first, last = layer_devices[0], layer_devices[-1]

    with torch.device("meta"), _no_init():
        model = ChatGLMForCausalLM(config, dtype=torch_dtype)
    if saved_quant is not None:
        from .quant import quantize_head_, quantize_model_

        quantize_model_(model, saved_quant, skip=_quant_skip)  # empty quantized modules on meta, filled below
        quantize_head_(model, saved_quant)
    expected = {n: tuple(p.shape) for n, p in model.state_dict(keep_vars=True).items()}
    if saved_quant is None:
        official = official_tensor_shapes(config)
        if official.keys() != expected.keys():  # model code and the official table must agree
            raise AssertionError(sorted(set(official) ^ set(expected)))

    def device_of(name: str) -> torch.device:
        layer = _layer_of(name)
        if layer is not None:
            return layer_devices[layer]
        return first if name.startswith("transformer.embedding") else last

    per_layer_left = [0] * config.num_layers
    for n in expected:
        layer = _layer_of(n)
        if layer is not None:
            per_layer_left[layer] += 1

    account = TensorAccount(expected, source=str(ckpt.path))
    # float16 on the CPU: fbgemm packs each finished layer on a second thread while this one reads the next
    # (packing releases the GIL; it is a third of a 2-core start for SmolLM2). A GGUF file's Q4_0/Q4_1 layer
    # matrices also get int4 packs of their own 4-bit codes there, for the one-row CPU decoder (cpu_decode).
    packer = ThreadPoolExecutor(1, thread_name_prefix="glmrun-pack") if cpu_half and quant is None else None
    packing: list[Future[int]] = []
    with _progress_bar(f"loading {ckpt.model_id}", progress) as bar, _shut_down(packer):
        if reader is not None:
            from .gguf_file import iter_gguf_tensors

            source = iter_gguf_tensors(reader, config, dtype=torch.float32)
        else:
            source = iter_tensors(ckpt.path, progress=bar)
        for name, tensor in source:
            if not account.add(name, tensor):
                continue
            module, attr, is_buffer = _target(model, name)  # quantized buffers keep their saved dtypes
            value = tensor.to(device=device_of(name), dtype=None if is_buffer else torch_dtype)
            _set_tensor(module, attr, is_buffer, value)
            layer = _layer_of(name)
            if layer is not None:
                per_layer_left[layer] -= 1
                if per_layer_left[layer] == 0 and quant is not None and saved_quant is None:
                    from .quant import quantize_model_

                    quantize_model_(model.layers[layer], quant)  # one layer at a time: low peak memory
                elif per_layer_left[layer] == 0 and packer is not None:
                    from .cpu_linear import attach_int4_, half_weights_

                    packing.append(packer.submit(half_weights_, model.layers[layer]))  # one layer at a time
                    if reader is not None:  # then the file's own 4-bit blocks for the CPU decoder
                        from .gguf_file import iter_gguf_q4

                        packing.append(packer.submit(attach_int4_, model, iter_gguf_q4(reader, config, [layer])))
        head: HalfPacked | None = None
        if packer is not None and config.tie_word_embeddings:
            # The tied output matrix is packed on this thread while the packing thread finishes the layers
            # (fbgemm's packing releases the GIL): ~1 s less to SmolLM2's first token on 2 cores.
            head = HalfPacked(model.transformer.embedding.word_embeddings.weight)
        for done in packing:
            done.result()  # every layer swapped (or its error raised) before the whole model is looked at
    account.finish()
    if quant is not None and saved_quant is None:
        from .quant import quantize_head_

        # The output layer at 8 bits (QuantSpec.head_bits): 4 bits there would cost more quality than it saves.
        quantize_head_(model, quant)
    if quant is not None:
        from .quant import tile_int4_linears_

        config = config.replace(quantization=quant)
        model.config = config
        tile_int4_linears_(model, torch_dtype)  # CUDA INT4 codes in the one-row kernel's order
    elif cpu_half:
        from .cpu_linear import half_weights_model_

        half_weights_model_(model, head)  # the output layer (the layers were converted as they loaded)
    elif dev.type == "cpu" and torch_dtype == torch.float32:
        from .cpu_linear import pack_model_

        pack_model_(model)  # blocked copies of the float32 matrices for multi-row products
    model.eval()
    return model, tokenizer


@contextmanager
def _shut_down(pool: ThreadPoolExecutor | None) -> Iterator[None]:
    """Leave with ``pool`` finished: on an error, its queued work is dropped and running work awaited."""
    try:
        yield
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


@contextmanager
def _no_init() -> Iterator[None]:
    """Skip torch's random initialisers while the model is built on ``meta``.

    Meta tensors hold no values, so initialising them changes nothing; but torch runs an initialiser on a
    meta tensor through its Python reference ops, whose first use imports ``torch._dynamo`` -- about 2 s
    of every start on a 2-core machine. ``nn.Linear``/``nn.Embedding`` look these functions up on
    ``torch.nn.init`` when they run, so replacing them for the duration of the build is enough.
    """
    names = ("kaiming_uniform_", "uniform_", "normal_")
    saved = {name: getattr(nn.init, name) for name in names}

    def keep(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return tensor

    try:
        for name in names:
            setattr(nn.init, name, keep)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _quant_skip(name: str) -> bool:
    return not name.startswith("transformer.encoder.layers.")
