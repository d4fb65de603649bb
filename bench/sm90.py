"""Offline Hopper inspection of every kernel specialisation the launchers would launch (no GPU needed).

``python -m bench.sm90 [--json PATH] [--quick]`` runs the real launchers of ``kernels/sym_kl.py`` and
``kernels/spectral_norm.py`` on *meta* tensors (shapes and dtypes, no data) with the SM count of an H200,
records each launch instead of running it (kernel, grid, arguments, constexprs, ``num_warps``), and
compiles that exact specialisation for ``sm_90a`` with Triton's compiler and its bundled ``ptxas``. So the
tile choice inspected is the launchers' own: nothing here re-implements it. Triton specialises integer
arguments on their values (``== 1``, divisible by 16), which this reproduces because the recorded
arguments are the launcher's own; tensors are assumed 16-byte aligned (as the CUDA caching allocator
returns them).

Per compiled kernel it reports, from the cubin (``cuobjdump --dump-resource-usage``) and its SASS
(``nvdisasm``):

* ``registers`` per thread, ``spills`` (``LDL``/``STL`` instructions in the SASS) and ``local_bytes``;
* ``smem``: shared memory per CTA (static + Triton's dynamic request);
* ``ctas_per_sm`` and ``occupancy``: the theoretical occupancy on an H100 SXM / H200 (one SM type: 64K
  32-bit registers allocated per warp in units of 256, 64 warps = 2048 threads, 228 KB of shared memory
  with 1 KB reserved per CTA, at most 32 CTAs), active warps / 64;
* ``instructions_per_column``: the SASS instructions of the main loop body divided by the columns one thread
  handles per iteration of it. The main loop is the backward branch (``BRA`` to an earlier label) whose body
  holds the most global loads, the first in program order on a tie (the symmetric-KL forward's guarded pass,
  which only rows with one-sided -inf entries redo, is a kernel of its own: ``_sym_kl_fwd_guarded_kernel``);
  its body is every instruction from the branch target to the branch. The columns per iteration come from the
  same body: the bytes its ``LDG`` instructions load divided by the bytes one column costs (``a`` + ``b``
  element sizes for the symmetric KL), so unrolling by the compiler cannot fool the count. This is issue slots
  per column per thread: an H200 SM issues 4 warp-instructions (128 thread-instructions) per cycle, so at
  ~1.98 GHz its 132 SMs sustain ~33e12 thread-instructions/s, and reading two bf16 inputs at 4.3 TB/s is
  ~1.07e12 columns/s: about 31 instructions per column is the break-even, fewer leave the kernel
  bandwidth-bound. ``null`` for kernels without a column loop (row-batched tiny vocabularies, fused or tiled
  spectral norm);
* ``loads_128``/``stores_128``: whether every global load / store of the main loop (or of the kernel,
  without one) is 128 bits wide, and the widths seen;
* ``barriers``/``shuffles`` in the main loop (block-wide reductions per iteration cost both).

The result is a table on stdout; ``--json PATH`` writes a list of records. Nothing runs on a GPU: the
numbers are the compiler's, the occupancy is theoretical, and no time or bandwidth is measured. On a
machine with a Hopper GPU, ``--gpu`` plans for its SM count, compiles through its driver and loads every
kernel on it, adding the driver's own register and spill counts (``driver_registers``,
``driver_spills``) to check this offline route against (``bench/gpu_suite.sh`` runs both).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import MockTensor

# The SM of an H100 SXM and an H200 (compute capability 9.0); both have 132 SMs.
SMS = 132
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers, allocated per warp
MAX_WARPS_PER_SM = 64  # 2048 threads
MAX_CTAS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_CTA = 1024

KL_VOCABS = (2, 3, 32000, 32001, 50257, 50265, 128256, 151936, 262144)
KL_ROWS = 8192
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HEADS = ((2, 768), (3, 1024), (1000, 4096), (128256, 4096))

# A reduced set for CI (tests/kernels/test_sm90.py): each path of each launcher once.
QUICK_KL = ((KL_ROWS, 2, "bfloat16", False), (KL_ROWS, 50257, "bfloat16", True),
            (KL_ROWS, 128256, "bfloat16", False), (KL_ROWS, 32001, "float32", False))
# Non-contiguous logits (shape recorded as (2, rows / 2, V)): both the causal-LM slice logits[:, :-1]
# ("slice": the aligned path with the slices' row offsets), or that slice against contiguous logits ("mixed":
# the strided columns path, for layouts the aligned path cannot take).
STRIDED = ((KL_ROWS, 50257, "bfloat16", "slice"), (KL_ROWS, 128256, "bfloat16", "slice"),
           (KL_ROWS, 128256, "float32", "slice"), (KL_ROWS, 50257, "bfloat16", "mixed"),
           (KL_ROWS, 128256, "float32", "mixed"))
QUICK_STRIDED = ((KL_ROWS, 50257, "bfloat16", "slice"), (KL_ROWS, 50257, "bfloat16", "mixed"))
# One chunk of linear_r3f_loss on a GPU: the default chunk rows (1 GiB budget, float32 GEMMs) for these V.
LINEAR = ((1046, 128256), (2670, 50257), (2, 3))
QUICK_LINEAR = ((1046, 128256),)
QUICK_HEADS = (((3, 1024), "float32"),)


def _bin(name: str) -> Optional[str]:
    """A CUDA tool bundled with Triton (``triton/backends/nvidia/bin``), else one on PATH, else None."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return str(bundled)
    return shutil.which(name)


def tools_missing() -> list[str]:
    """The CUDA tools this inspection needs (ptxas, cuobjdump, nvdisasm) that cannot be found."""
    return [name for name in ("ptxas", "cuobjdump", "nvdisasm") if _bin(name) is None]


# ---------------------------------------------------------------------------------------------- compiling
class _OfflineDriver:
    """Just enough of a Triton driver for ``JITFunction.warmup``: an sm_90a target, no device."""

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> str:
        return "sm90a-offline"  # a key of its own in the JIT's per-device caches

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")


@contextlib.contextmanager
def offline_sm90() -> Iterator[None]:
    """Make Triton compile for sm_90a (there may be no GPU, and no CUDA driver, on this machine)."""
    previous = driver._active
    driver.set_active(_OfflineDriver())
    try:
        yield
    finally:
        driver._active = previous


@dataclass
class Launch:
    """One recorded launch: the kernel, its grid, its arguments and its compile options."""

    kernel: Any
    grid: tuple
    args: tuple
    meta: dict

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def spec_key(self) -> tuple:
        """What Triton specialises on: tensor dtypes, integer values' classes, constexprs and options."""
        def arg_key(x):
            if isinstance(x, torch.Tensor):
                return str(x.dtype)
            if isinstance(x, bool) or not isinstance(x, int):
                return type(x).__name__
            return "1" if x == 1 else ("d16" if x % 16 == 0 else "i")
        return (self.name, tuple(arg_key(x) for x in self.args), tuple(sorted(self.meta.items())))


@contextlib.contextmanager
def recording(sms: int = SMS) -> Iterator[list[Launch]]:
    """Within: both kernel modules record launches instead of running them, planning for ``sms`` SMs."""
    from r3f_opt.kernels import spectral_norm, sym_kl

    launches: list[Launch] = []

    def record(kernel, grid, *args, **meta):
        launches.append(Launch(kernel, tuple(grid), args, meta))

    saved = [(m, n, getattr(m, n)) for m in (sym_kl, spectral_norm) for n in ("_launch", "_sm_count")]
    for module in (sym_kl, spectral_norm):
        module._launch = record
        module._sm_count = lambda device: sms
    try:
        yield launches
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def kl_launches(n_rows: int, vocab: int, dtype: torch.dtype, masked: bool, sms: int = SMS,
                layout: str = "contiguous") -> list[Launch]:
    """The launches of one symmetric-KL forward and backward (gradients for both inputs, a batchmean-like
    upstream gradient of stride 0) on ``(n_rows, vocab)`` logits: ``layout`` "contiguous"; "slice": both the
    causal-LM slice ``logits[:, :-1]`` of ``(2, n_rows / 2 + 1, vocab)`` logits (rows not V apart, one layout:
    the aligned path); "mixed": ``a`` that slice, ``b`` contiguous (two layouts: the strided columns path)."""
    from r3f_opt.kernels import sym_kl

    def logits(sliced: bool) -> torch.Tensor:
        if sliced:
            return torch.empty(2, n_rows // 2 + 1, vocab, dtype=dtype, device="meta")[:, :-1].requires_grad_()
        return torch.empty(n_rows, vocab, dtype=dtype, device="meta", requires_grad=True)

    a = logits(layout != "contiguous")
    b = logits(layout == "slice")
    if layout == "mixed":
        b = b.reshape(a.shape).detach().requires_grad_()
    mask = torch.empty(n_rows, dtype=torch.bool, device="meta") if masked else None
    with recording(sms) as launches:
        rows = sym_kl.SymmetricKLRows.apply(a, b, mask)
        rows.sum().backward()
    return launches


def linear_launches(n_rows: int, vocab: int, sms: int = SMS) -> list[Launch]:
    """The launches of one chunk of the fused LM head's objective (``linear_r3f_loss`` on CUDA): the forward,
    then the backward with the cross-entropy gradient, in place on two contiguous float32 logits blocks."""
    from r3f_opt.kernels import sym_kl

    a = torch.empty(n_rows, vocab, dtype=torch.float32, device="meta")
    b = torch.empty(n_rows, vocab, dtype=torch.float32, device="meta")
    g = torch.empty(n_rows, dtype=torch.float32, device="meta")
    ce = (torch.empty(n_rows, dtype=torch.int64, device="meta"), torch.empty(n_rows, device="meta"), 0.1)
    with recording(sms) as launches:
        sym_kl.kl_ce_grads_(a, b, g, ce)
    return launches


def head_launches(C: int, H: int, dtype: torch.dtype, sms: int = SMS) -> list[Launch]:
    """The launches of one training forward (one power iteration) and its backward of the R4F spectral
    norm on a contiguous ``C x H`` weight."""
    from r3f_opt.kernels import spectral_norm as sn

    w = torch.empty(C, H, dtype=dtype, device="meta")
    u = torch.empty(C, dtype=dtype, device="meta")
    v = torch.empty(H, dtype=dtype, device="meta")
    fused = sn.fits_one_program(C, H)
    with recording(sms) as launches:
        _, u_save, v_save, sigma = sn._kernel_forward(w, u, v, 1, 1e-12, fused)
        sn._kernel_backward(torch.empty_like(w), w, u_save, v_save, sigma, fused)
    return launches


def compile_launch(launch: Launch, on_gpu: bool = False):
    """The CompiledKernel of this exact specialisation for sm_90a (Triton's own cache makes repeats cheap);
    ``on_gpu``: for the GPU present, through its driver, and loaded on it (``n_regs``, ``n_spills``)."""
    args = tuple(MockTensor(x.dtype) if isinstance(x, torch.Tensor) else x for x in launch.args)
    with (contextlib.nullcontext() if on_gpu else offline_sm90()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
        compiled = launch.kernel.warmup(*args, grid=launch.grid, **launch.meta)
    if on_gpu:
        compiled._init_handles()  # loads the cubin: the driver's own register and spill counts
    return compiled


# ------------------------------------------------------------------------------------------------ reading
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")


@dataclass
class Sass:
    """The kernel's SASS as (address, opcode, operands) with its labels' addresses."""

    instrs: list[tuple[int, str, str]]
    labels: dict[str, int]

    @classmethod
    def parse(cls, text: str) -> "Sass":
        instrs, labels, pending = [], {}, []
        for line in text.splitlines():
            label = _LABEL.match(line.strip())
            if label:
                pending.append(label.group(1))
                continue
            m = _INSTR.search(line)
            if m:
                addr = int(m.group(1), 16)
                for name in pending:
                    labels[name] = addr
                pending = []
                instrs.append((addr, m.group(3), m.group(4)))
        return cls(instrs, labels)

    def loops(self) -> list[list[tuple[int, str, str]]]:
        """Bodies of the backward branches: instructions from the target label to the branch."""
        bodies = []
        for addr, op, rest in self.instrs:
            if op.split(".")[0] != "BRA":
                continue
            target = re.search(r"\(?(\.L_x_\d+)\)?", rest)
            start = self.labels.get(target.group(1)) if target else None
            if start is not None and start < addr:
                bodies.append([i for i in self.instrs if start <= i[0] <= addr])
        return bodies


def _width(op: str) -> int:
    """Bits moved by one LDG/STG: .128, .64, .U16/.S16, .U8/.S8, else 32."""
    parts = op.split(".")
    for p in parts:
        if p in ("128", "64"):
            return int(p)
        if p in ("U16", "S16"):
            return 16
        if p in ("U8", "S8"):
            return 8
    return 32


def _is(op: str, base: str) -> bool:
    return op.split(".")[0] == base


def analyse_sass(sass: Sass, bytes_per_column: Optional[int]) -> dict:
    """Main-loop statistics (see the module docstring)."""
    with_loads = [body for body in sass.loops() if any(_is(op, "LDG") for _, op, _ in body)]
    body = max(with_loads, key=lambda b: sum(_is(op, "LDG") for _, op, _ in b), default=None)  # the first of
    scope = body if body is not None else sass.instrs
    loads = [_width(op) for _, op, _ in scope if _is(op, "LDG")]
    stores = [_width(op) for _, op, _ in scope if _is(op, "STG")]
    out = {
        "loop_instructions": None, "instructions_per_column": None,
        "load_widths": sorted(set(loads)), "store_widths": sorted(set(stores)),
        "loads_128": bool(loads) and all(w == 128 for w in loads),
        "stores_128": (all(w == 128 for w in stores) if stores else None),
        "barriers": sum(_is(op, "BAR") for _, op, _ in scope) if body is not None else None,
        "shuffles": sum(_is(op, "SHFL") for _, op, _ in scope) if body is not None else None,
    }
    if body is not None:
        n = sum(1 for _, op, _ in body if op != "NOP")
        out["loop_instructions"] = n
        if bytes_per_column:
            columns = sum(loads) / 8 / bytes_per_column  # columns one thread reads per iteration
            out["instructions_per_column"] = round(n / columns, 2) if columns else None
    return out


def resources(cubin: bytes) -> tuple[dict, str]:
    """(``{registers, local_bytes, static_smem}``, SASS text) of a cubin, from cuobjdump and nvdisasm."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", str(path)], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([_bin("nvdisasm"), "-c", str(path)], check=True, capture_output=True,
                              text=True).stdout
    field_ = lambda name: int(re.search(rf"\b{name}:(\d+)", usage).group(1))  # noqa: E731
    return {"registers": field_("REG"), "local_bytes": field_("LOCAL"), "static_smem": field_("SHARED")}, sass


def occupancy(registers: int, num_warps: int, smem: int) -> tuple[int, float, str]:
    """(CTAs per SM, active warps / 64, the limiting resource) on an H100 SXM / H200 SM."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {
        "registers": (REGS_PER_SM // regs_per_warp) // num_warps,
        "warps": MAX_WARPS_PER_SM // num_warps,
        "smem": SMEM_PER_SM // (smem + SMEM_RESERVED_PER_CTA),
        "ctas": MAX_CTAS_PER_SM,
    }
    limiter = min(limits, key=limits.get)
    ctas = limits[limiter]
    return ctas, ctas * num_warps / MAX_WARPS_PER_SM, limiter


@dataclass
class Record:
    kernel: str
    role: str
    dtype: str
    shape: list
    masked: Optional[bool]
    grid: list
    num_warps: int
    constexprs: dict
    registers: int
    spills: int
    local_bytes: int
    smem: int
    ctas_per_sm: int
    occupancy: float
    occupancy_limiter: str
    instructions_per_column: Optional[float]
    loop_instructions: Optional[int]
    loads_128: bool
    stores_128: Optional[bool]
    load_widths: list
    store_widths: list
    barriers: Optional[int]
    shuffles: Optional[int]
    driver_registers: Optional[int] = None  # --gpu: what the CUDA driver reports for the loaded kernel
    driver_spills: Optional[int] = None
    layout: str = "contiguous"  # of the inputs: "slice" (both logits[:, :-1]), "mixed" (a sliced, b not)


_ROLES = {"_sym_kl_fwd_kernel": "forward", "_sym_kl_merge_kernel": "merge",
          "_sym_kl_fwd_guarded_kernel": "guarded forward", "_sym_kl_bwd_kernel": "backward"}


def inspect_launch(launch: Launch, dtype: str, shape: tuple, masked: Optional[bool],
                   bytes_per_column: Optional[int], cache: dict, on_gpu: bool = False) -> Record:
    """Compile (once per specialisation) and measure one recorded launch."""
    key = launch.spec_key()
    if key not in cache:
        compiled = compile_launch(launch, on_gpu)
        res, sass_text = resources(compiled.asm["cubin"])
        smem = res["static_smem"] + compiled.metadata.shared
        # static SHARED of a Triton cubin is the CTA's system-reserved 1 KB on sm_90; count it once
        smem_user = max(smem - SMEM_RESERVED_PER_CTA, 0) if res["static_smem"] >= SMEM_RESERVED_PER_CTA else smem
        sass = Sass.parse(sass_text)
        spills = sum(1 for _, op, _ in sass.instrs if op.split(".")[0] in ("LDL", "STL"))
        driver_counts = {"driver_registers": compiled.n_regs, "driver_spills": compiled.n_spills} if on_gpu else {}
        cache[key] = (compiled.metadata.num_warps, res, smem_user, spills, sass, driver_counts)
    num_warps, res, smem_user, spills, sass, driver_counts = cache[key]
    looped = ("_sym_kl_fwd_kernel", "_sym_kl_fwd_guarded_kernel", "_sym_kl_bwd_kernel")  # column loops
    stats = analyse_sass(sass, bytes_per_column if launch.name in looped else None)
    ctas, occ, limiter = occupancy(res["registers"], num_warps, smem_user)
    constexprs = {k: v for k, v in launch.meta.items() if k != "num_warps" and k.isupper()}
    return Record(kernel=launch.name, role=_ROLES.get(launch.name, launch.name.replace("_sn_", "sn ")),
                  dtype=dtype, shape=list(shape), masked=masked, grid=list(launch.grid), num_warps=num_warps,
                  constexprs=constexprs, registers=res["registers"], spills=spills,
                  local_bytes=res["local_bytes"], smem=smem_user, ctas_per_sm=ctas, occupancy=round(occ, 4),
                  occupancy_limiter=limiter, **stats, **driver_counts)


def inspect_all(quick: bool = False, progress: bool = True, sms: int = SMS, on_gpu: bool = False) -> list[Record]:
    """Records for every launch of the shape list (``quick``: the reduced CI set), planned for ``sms``
    SMs; ``on_gpu``: compiled for and loaded on the GPU present."""
    cases: list[tuple[str, tuple, Any]] = []
    if quick:
        cases += [("kl", (n, v, dt, m), None) for n, v, dt, m in QUICK_KL]
        cases += [("head", (c, h, dt), None) for (c, h), dt in QUICK_HEADS]
        cases += [("linear", (n, v), None) for n, v in QUICK_LINEAR]
        cases += [("strided", p, None) for p in QUICK_STRIDED]
    else:
        cases += [("kl", (KL_ROWS, v, dt, m), None) for v in KL_VOCABS for dt in DTYPES for m in (False, True)]
        cases += [("kl", (4, 262144, dt, False), None) for dt in ("float32", "bfloat16")]  # few rows: split
        cases += [("head", (c, h, dt), None) for c, h in HEADS for dt in DTYPES]
        cases += [("linear", (n, v), None) for n, v in LINEAR]
        cases += [("strided", p, None) for p in STRIDED]
    records: list[Record] = []
    cache: dict = {}
    start = time.monotonic()
    for i, (kind, params, _) in enumerate(cases):
        if kind == "kl":
            n, v, dt, masked = params
            dtype = DTYPES[dt]
            launches = kl_launches(n, v, dtype, masked, sms)
            bpc = 2 * dtype.itemsize
            for launch in launches:
                records.append(inspect_launch(launch, dt, (n, v), masked, bpc, cache, on_gpu))
        elif kind == "strided":
            n, v, dt, layout = params
            for launch in kl_launches(n, v, DTYPES[dt], False, sms, layout=layout):
                rec = inspect_launch(launch, dt, (2, n // 2, v), False, 2 * DTYPES[dt].itemsize, cache, on_gpu)
                records.append(dataclasses.replace(rec, layout=layout))
        elif kind == "linear":
            n, v = params
            for launch in linear_launches(n, v, sms):
                records.append(inspect_launch(launch, "float32", (n, v), False, 8, cache, on_gpu))
        else:
            c, h, dt = params
            for launch in head_launches(c, h, DTYPES[dt], sms):
                records.append(inspect_launch(launch, dt, (c, h), None, None, cache, on_gpu))
        if progress:
            elapsed = time.monotonic() - start
            eta = elapsed / (i + 1) * (len(cases) - i - 1)
            print(f"[{i + 1}/{len(cases)}] {kind} {params}: {elapsed:.0f} s, ETA {eta:.0f} s", file=sys.stderr)
    return records


def table(records: list[Record]) -> str:
    """A Markdown table, one line per distinct (kernel, dtype, shape, mask)."""
    head = ("| kernel | dtype | shape | mask | warps | constexprs | regs | spills | smem | CTAs/SM | occupancy "
            "| instr/col | loop LDG/STG bits | BAR/SHFL in loop |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    seen = set()
    for r in records:
        key = (r.kernel, r.dtype, tuple(r.shape), r.masked, tuple(sorted(r.constexprs.items())), r.num_warps)
        if key in seen:
            continue
        seen.add(key)
        cx = ", ".join(f"{k}={v}" for k, v in r.constexprs.items() if not isinstance(v, bool) or v)
        ipc = "–" if r.instructions_per_column is None else f"{r.instructions_per_column:.1f}"
        bars = "–" if r.barriers is None else f"{r.barriers}/{r.shuffles}"
        widths = f"{'/'.join(map(str, r.load_widths)) or '–'} / {'/'.join(map(str, r.store_widths)) or '–'}"
        mask = "–" if r.masked is None else ("yes" if r.masked else "no")
        shape = "×".join(map(str, r.shape)) + ("" if r.layout == "contiguous" else f" ({r.layout})")
        lines.append(f"| {r.kernel} | {r.dtype} | {shape} | {mask} | {r.num_warps} | {cx} | "
                     f"{r.registers} | {r.spills} | {r.smem} | {r.ctas_per_sm} | {r.occupancy:.0%} | {ipc} | "
                     f"{widths} | {bars} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sm90", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the records as a JSON list to this path")
    parser.add_argument("--quick", action="store_true", help="the reduced set the CI test uses")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--gpu", action="store_true",
                        help="on a machine with a Hopper GPU: plan for its SM count, compile through its driver and "
                             "load each kernel on it, adding the driver's register and spill counts to the records")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench.sm90 compiles the real kernels: unset TRITON_INTERPRET (the interpreter replaces them)",
              file=sys.stderr)
        return 2
    missing = tools_missing()
    if missing:
        print(f"bench.sm90 needs {', '.join(missing)} (bundled with Triton in triton/backends/nvidia/bin, or on "
              f"PATH): install a Triton wheel with the NVIDIA backend or the CUDA toolkit", file=sys.stderr)
        return 2
    sms, where = SMS, "offline"
    if args.gpu:
        if not torch.cuda.is_available():
            print("--gpu needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
        props = torch.cuda.get_device_properties(0)
        if (props.major, props.minor) != (9, 0):
            print(f"--gpu: {props.name} is sm_{props.major}{props.minor}, not sm_90: the occupancy model and the "
                  f"thresholds are Hopper's", file=sys.stderr)
        sms, where = props.multi_processor_count, f"on {props.name}"
    records = inspect_all(quick=args.quick, progress=not args.quiet, sms=sms, on_gpu=args.gpu)
    print(f"sm_90a inspection ({where}): triton {triton.__version__}, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}, occupancy for an H100 SXM / H200 SM, {sms} SMs planned for")
    print(table(records))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"triton": triton.__version__, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                "target": "sm_90a", "sms": sms, "where": where, "command": " ".join(["python -m bench.sm90", *(argv or sys.argv[1:])])}
        args.json.write_text(json.dumps([dict(asdict(r), **{"meta": meta}) for r in records], indent=1) + "\n")
        print(f"wrote {len(records)} records to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
