"""``python -m bench``: the kernel microbenchmarks, a quick sweep by default, on the device present.

Runs ``bench.spectral_norm`` (R4F head normalisation: fused kernel vs torch's parametrization) and
``bench.sym_kl`` (symmetric KL: Triton kernel, the PyTorch path before and after chunking, eager,
torch.compile, Liger), with progress and an ETA on stderr::

    python -m bench                   # quick: about a minute on a loaded 2-core CPU VM
    python -m bench --full            # each module's default sweep (many minutes on CPU)
    python -m bench --out DIR         # where the JSON and PNG files go (default bench/results/local/)
    python -m bench --save            # update the committed bench/results/* instead

Each also runs alone with its own options (``python -m bench.sym_kl --help``). The training-step cost is
``python -m bench.step_cost`` (standard vs R3F / R4F) and ``python -m bench.methods`` (every regulariser:
R3F, R4F, R-Drop, SMART, FreeLB; seconds, passes counted and peak memory per step).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from .common import LOCAL_RESULTS, Progress


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--full", action="store_true", help="each module's default sweep instead of the quick one")
    ap.add_argument("--out", type=Path, default=None, help=f"results folder (default {LOCAL_RESULTS})")
    ap.add_argument("--save", action="store_true", help="write the committed bench/results/* instead of --out")
    args = ap.parse_args(argv)
    if args.save and args.out is not None:
        ap.error("--save writes the committed results; give either --save or --out")

    import torch

    from . import spectral_norm, sym_kl

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    out = args.out or LOCAL_RESULTS
    where = ["--save"] if args.save else ["--out"]
    progress = Progress()
    sn_args = [] if args.full else ["--quick"]
    spectral_norm.main(sn_args + where + ([] if args.save else [str(out / f"spectral_norm_{kind}.json")]),
                       progress=progress)
    print()
    kl_args = [] if args.full else ["--quick"]
    sym_kl.main(kl_args + where + ([] if args.save else [str(out / f"sym_kl_{kind}.json")]), progress=progress)
    progress.done()


if __name__ == "__main__":
    main()
