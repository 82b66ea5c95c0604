"""lossfuse's benchmark suite: ``lossfuse-bench`` (or ``python -m lossfuse.bench``).

Times every lossfuse backend usable on the device against torch eager, torch.compile of the same torch
code, and anchor libraries when installed, after checking each against a float64 reference; reports
median times, speed-ups measured side by side, effective GB/s from counted bytes against the measured
copy bandwidth, and peak memory. See bench/README.md for the columns, the byte formulas and the
memory measure.

    lossfuse-bench                       # default preset on the best device (about 3 min on 2 CPU cores)
    lossfuse-bench --shapes quick --loss ce --providers cpu,torch

Programmatic use: ``run_suite(["--shapes", "quick", ...])`` returns the result and the output paths.
"""

from .cli import main, run_suite
from ..catalog import LOSSES, LossEntry
from .presets import PRESET_NAMES, Case, get_preset
from .providers import PROVIDERS, Provider

__all__ = ["main", "run_suite", "LOSSES", "LossEntry", "PRESET_NAMES", "Case", "get_preset", "PROVIDERS",
           "Provider"]
