"""Memory estimation (from config.json only) and measurement (running the scenario), both of one
`MemoryScenario`."""

from .estimator import DEVICE_OVERHEAD_BYTES, MODES, OPTIMIZERS, TERMS, MemoryBreakdown, estimate_memory
from .measure import MemoryMeasurement, measure_memory, saved_activation_bytes
from .measure_parallel import measure_memory_parallel
from .parallel import STRATEGIES, DeviceMemoryError, ParallelPlan, check_fits
from .report import comparison_markdown, format_bytes, plot_breakdowns
from .scenarios import MemoryScenario, standard_breakdowns
from .training import TRAINING_METHODS, TrainingSetup

__all__ = [
    "DEVICE_OVERHEAD_BYTES",
    "MODES",
    "OPTIMIZERS",
    "STRATEGIES",
    "TERMS",
    "TRAINING_METHODS",
    "DeviceMemoryError",
    "MemoryBreakdown",
    "MemoryMeasurement",
    "MemoryScenario",
    "ParallelPlan",
    "TrainingSetup",
    "check_fits",
    "comparison_markdown",
    "estimate_memory",
    "format_bytes",
    "measure_memory",
    "measure_memory_parallel",
    "plot_breakdowns",
    "saved_activation_bytes",
    "standard_breakdowns",
]
