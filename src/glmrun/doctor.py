"""``glmrun doctor``: what this machine offers, and how a model would be placed on it, before loading anything.

One responsibility: gather the facts (torch and CUDA versions, the GPUs' names and memory, the CPU and its
RAM) and the model's shape (its ``config.json``, a ``.gguf`` file's metadata or a named preset; no weights
are read), hand them to the pure planner in :mod:`glmrun.placement`, and report. ``--simulate-gpus
8GiB,12GiB`` plans for cards that are not here, so the answer to "will it fit on my two cards?" needs no
GPU at all.

Exit codes, as :mod:`glmrun.cli`: 0 the plan fits; 3 it does not (the reason, per device, and what would
fit are printed); 2 bad arguments or an unreadable model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import ModelConfig, QuantSpec
from .errors import GlmrunError, InvalidArgumentError
from .placement import (
    CPU_INDEX,
    CUDA_CONTEXT_RESERVE,
    DEFAULT_PREFILL_CHUNK,
    DeviceSpec,
    MiB,
    NoFitError,
    device_budget,
    format_bytes,
    parse_devices,
    parse_max_memory,
    parse_memory,
    plan_model,
)

__all__ = ["GpuInfo", "HostInfo", "add_parser", "cuda_gpus", "host_info", "run", "simulated_gpus"]

EXIT_OK, EXIT_INPUT, EXIT_NO_FIT = 0, 2, 3  # as glmrun.cli
DEFAULT_PRESET = "chatglm2-6b"
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int | None  # None for a simulated card
    capability: str | None  # "8.6"
    multiprocessors: int | None
    simulated: bool = False


@dataclass(frozen=True)
class HostInfo:
    python: str
    torch: str
    cuda: str | None  # the CUDA version torch was built with; None for a CPU build
    driver: str | None  # NVIDIA driver, when nvidia-ml-py (pynvml) is installed
    cpu: str
    cores: int
    ram_total_bytes: int | None
    ram_available_bytes: int | None


# -- facts -------------------------------------------------------------------------------------------


def _meminfo() -> tuple[int | None, int | None]:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if v.split()}
        return fields.get("MemTotal"), fields.get("MemAvailable")
    except (OSError, ValueError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), None
        except (AttributeError, ValueError, OSError):
            return None, None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _driver_version() -> str | None:
    try:
        import pynvml  # nvidia-ml-py: optional, torch only uses it for utilization readings

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # not installed, no driver, or an NVML error: the driver is then just not shown
        return None


def host_info(*, query_driver: bool = True) -> HostInfo:
    import torch

    total, available = _meminfo()
    return HostInfo(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        driver=_driver_version() if query_driver and torch.version.cuda else None,
        cpu=_cpu_name(),
        cores=os.cpu_count() or 1,
        ram_total_bytes=total,
        ram_available_bytes=available,
    )


def cuda_gpus() -> list[GpuInfo]:
    """The GPUs torch sees. Reading free memory creates this process's CUDA context on each of them."""
    import torch

    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        out.append(GpuInfo(i, props.name, total, free, f"{props.major}.{props.minor}", props.multi_processor_count))
    return out


def simulated_gpus(text: str) -> list[GpuInfo]:
    """``"8GiB,12GiB"`` -> made-up cards 0, 1, ... of those total sizes."""
    sizes = text.split(",")
    if not text.strip() or any(not s.strip() for s in sizes):
        raise InvalidArgumentError(f"--simulate-gpus {text!r}: give card sizes separated by commas, e.g. 8GiB,12GiB")
    return [GpuInfo(i, f"simulated GPU {i}", parse_memory(s), None, None, None, True) for i, s in enumerate(sizes)]


def _device_specs(
    gpus: list[GpuInfo], devices: list[int] | None, max_memory: dict[int, int] | None, warnings: list[str]
) -> list[DeviceSpec]:
    by_index = {g.index: g for g in gpus}
    chosen = devices if devices is not None else [g.index for g in gpus]
    unknown = [i for i in chosen if i not in by_index]
    if unknown:
        raise InvalidArgumentError(
            f"--devices names GPU {', '.join(map(str, unknown))}, but the GPUs here are "
            f"{', '.join(map(str, sorted(by_index))) or 'none'}"
        )
    stray = sorted(set(max_memory or {}) - set(chosen))
    if stray:
        raise InvalidArgumentError(f"--max-memory names GPU {', '.join(map(str, stray))}, which is not being used")
    specs = []
    for i in chosen:
        gpu = by_index[i]
        cap = (max_memory or {}).get(i)
        if cap is not None and cap > gpu.total_bytes:
            raise InvalidArgumentError(
                f"--max-memory gives GPU {i} {format_bytes(cap)}, but it has {format_bytes(gpu.total_bytes)} in all"
            )
        if cap is not None and cap < MiB:
            warnings.append(f"--max-memory gives GPU {i} only {cap} bytes (a number without a unit is bytes)")
        if cap is not None and cap > gpu.total_bytes - CUDA_CONTEXT_RESERVE:
            warnings.append(
                f"--max-memory leaves GPU {i} less than the {format_bytes(CUDA_CONTEXT_RESERVE)} the CUDA context "
                "and libraries take outside torch: it may run out of memory below its budget"
            )
        budget = device_budget(gpu.total_bytes, max_memory=cap, free_bytes=gpu.free_bytes)
        specs.append(DeviceSpec(i, gpu.name, gpu.total_bytes, budget))
    return specs


def _cpu_spec(host: HostInfo) -> DeviceSpec | None:
    if host.ram_total_bytes is None:
        return None
    available = host.ram_available_bytes if host.ram_available_bytes is not None else host.ram_total_bytes
    return DeviceSpec(CPU_INDEX, host.cpu, host.ram_total_bytes, available, reserve_bytes=0, workspace_bytes=0)


def _load_config(args: argparse.Namespace) -> tuple[ModelConfig, str]:
    if args.model:
        path = Path(args.model).expanduser()
        if path.suffix.lower() == ".gguf":
            from .gguf_file import load_gguf_config

            return load_gguf_config(path), str(path)
        from .config import load_chatglm_config

        return load_chatglm_config(path), str(path)
    name = args.preset or DEFAULT_PRESET
    from .checkpoint import PRESETS

    if name not in PRESETS:
        raise InvalidArgumentError(f"unknown preset {name!r}: choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name], f"preset {name}"


# -- the command -------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="show the GPUs and how a model would be placed on them, before loading it",
        description="List torch, CUDA, the GPUs and the CPU, then plan where each layer of the model would go "
        "and how much memory every device would need, reading only the model's config. Exit code 0: it fits; "
        "3: it does not (with what would); 2: bad arguments.",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", "-m", metavar="DIR", help="a ChatGLM2/3 folder (its config.json) or a .gguf file")
    source.add_argument("--preset", metavar="NAME", help=f"a known model shape (default: {DEFAULT_PRESET})")
    p.add_argument(
        "--dtype",
        choices=sorted(_DTYPE_BYTES),
        help="dtype (default: the checkpoint's on a GPU; on the CPU float16 matrices with float32 arithmetic)",
    )
    p.add_argument("--quantize", choices=["int8", "int4"], help="plan for weight-only quantization on load")
    p.add_argument("--context", type=int, metavar="N", help="context length to plan for (default: the model's)")
    p.add_argument("--batch", type=int, default=1, metavar="N", help="sequences decoded together (default 1)")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=DEFAULT_PREFILL_CHUNK,
        metavar="N",
        help=f"prompt tokens computed per step (default {DEFAULT_PREFILL_CHUNK})",
    )
    p.add_argument("--devices", metavar="0,1", help="GPUs to split the model over, in order (default: all)")
    p.add_argument(
        "--max-memory",
        metavar="0=7.5GiB,1=11.5GiB",
        help="what glmrun may allocate on each GPU (default: the card less 0.5 GiB, at most what is free)",
    )
    p.add_argument(
        "--simulate-gpus", metavar="8GiB,12GiB", help="plan for cards of these sizes instead of the real ones"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report: dict[str, Any] = {"plan": None, "fits": False, "error": None, "suggestions": [], "warnings": []}
    table = None
    try:
        code, table = _diagnose(args, report)
    except GlmrunError as exc:
        report["error"] = {"kind": "invalid_input", "type": type(exc).__name__, "message": str(exc)}
        code = EXIT_INPUT
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_text(report, table)
    return code


def _diagnose(args: argparse.Namespace, report: dict[str, Any]) -> tuple[int, str | None]:
    """Fill ``report``; return the exit code and the plan's table."""
    simulated = args.simulate_gpus is not None
    gpus = simulated_gpus(args.simulate_gpus) if simulated else None
    devices = parse_devices(args.devices) if args.devices else None
    max_memory = parse_max_memory(args.max_memory) if args.max_memory else None
    host = host_info(query_driver=not simulated)
    report["host"] = asdict(host)
    if gpus is None:
        gpus = cuda_gpus()
    report["gpus"] = [asdict(g) for g in gpus]
    report["simulated"] = simulated
    config, source = _load_config(args)
    on_gpu = bool(gpus)
    dtype = args.dtype or (config.torch_dtype if on_gpu else "float32")
    from .loader import default_group_size, resolve_checkpoint
    from .quant import fitting_group_size

    # the group size glmrun.load gives "--quantize int8|int4" for this model
    group = default_group_size(resolve_checkpoint(args.model)) if args.model else fitting_group_size(config)
    quant = QuantSpec(int(args.quantize[3:]), group) if args.quantize else None
    context = args.context if args.context is not None else config.seq_length
    if context > config.seq_length:
        report["warnings"].append(
            f"--context {context} is beyond the model's {config.seq_length}; the engine caps it there"
        )
        context = config.seq_length
    effective_quant = quant or config.quantization
    report["model"] = {
        "source": source,
        "family": config.family,
        "num_layers": config.num_layers,
        "parameters": config.num_parameters(),
        "dtype": dtype,
        "quantization": effective_quant.name if effective_quant else None,
        "context_length": context,
    }
    if on_gpu:
        specs = _device_specs(gpus, devices, max_memory, report["warnings"])
    else:
        if devices is not None or max_memory is not None:
            raise InvalidArgumentError(
                "--devices / --max-memory name GPUs, but torch sees no CUDA GPU here; use --simulate-gpus to plan "
                "for cards that are not in this machine"
            )
        cpu = _cpu_spec(host)
        if cpu is None:
            report["warnings"].append("the RAM size of this machine could not be read: no plan for the CPU")
            return EXIT_OK, None
        specs = [cpu]
    try:
        plan = plan_model(
            config,
            specs,
            dtype_bytes=_DTYPE_BYTES[dtype],
            quant=quant,
            context_length=context,
            batch=args.batch,
            prefill_chunk=args.prefill_chunk,
        )
    except NoFitError as exc:
        report["plan"] = exc.attempt.to_json()
        report["error"] = exc.to_json()
        report["suggestions"] = [s.to_json() for s in exc.suggestions]
        return EXIT_NO_FIT, exc.attempt.summary()
    report["plan"] = plan.to_json()
    report["fits"] = True
    return EXIT_OK, plan.summary()


def _print_text(report: dict[str, Any], table: str | None) -> None:
    out = sys.stdout
    host = report.get("host")
    if host:
        cuda = f"CUDA {host['cuda']}" if host["cuda"] else "a CPU build (no CUDA)"
        driver = f", NVIDIA driver {host['driver']}" if host["driver"] else ""
        print(f"glmrun doctor -- Python {host['python']}, torch {host['torch']}, {cuda}{driver}", file=out)
        ram = ""
        if host["ram_total_bytes"]:
            ram = f", {format_bytes(host['ram_total_bytes'])} RAM"
            if host["ram_available_bytes"] is not None:
                ram += f" ({format_bytes(host['ram_available_bytes'])} available)"
        print(f"CPU: {host['cpu']}, {host['cores']} cores{ram}", file=out)
    gpus = report.get("gpus")
    if gpus:
        print("GPUs (simulated with --simulate-gpus):" if report.get("simulated") else "GPUs:", file=out)
        for g in gpus:
            extra = []
            if g["free_bytes"] is not None:
                extra.append(f"{format_bytes(g['free_bytes'])} free")
            if g["capability"]:
                extra.append(f"compute capability {g['capability']}, {g['multiprocessors']} SMs")
            detail = f" ({'; '.join(extra)})" if extra else ""
            print(f"  cuda:{g['index']}  {g['name']}  {format_bytes(g['total_bytes'])}{detail}", file=out)
    elif gpus is not None:
        print("no CUDA GPU: torch sees none, so glmrun would run on the CPU (plan below is for RAM)", file=out)
    model = report.get("model")
    if model:
        quant = model["quantization"] or "no quantization"
        print(
            f"model: {model['source']} ({model['family']}): {model['num_layers']} layers, "
            f"{model['parameters'] / 1e9:.2f} B parameters; {model['dtype']}, {quant}",
            file=out,
        )
    for w in report["warnings"]:
        print(f"warning: {w}", file=out)
    if table:
        title = "plan" if report["fits"] else "best attempt (does NOT fit)"
        print(f"{title} -- only the config was read, nothing is loaded:", file=out)
        print(table, file=out)
    error = report["error"]
    if error is None:
        if report["fits"]:
            print("result: fits; every device stays within its budget.", file=out)
        return
    if report["plan"] is not None:
        print(f"result: does not fit. {error['message']}", file=out)
    else:
        print(f"glmrun doctor: error: {error['message']}", file=sys.stderr)
