"""Memory estimation (from config.json only) and measurement (running the scenario), both of one
`MemoryScenario`."""

from .estimator import DEVICE_OVERHEAD_BYTES, MODES, OPTIMIZERS, TERMS, MemoryBreakdown, estimate_memory
from .measure import MemoryMeasurement, measure_memory, saved_activation_bytes
from .report import comparison_markdown, format_bytes, plot_breakdowns
from .scenarios import MemoryScenario, standard_breakdowns
from .training import TRAINING_METHODS, TrainingSetup

__all__ = [
    "DEVICE_OVERHEAD_BYTES",
    "MODES",
    "OPTIMIZERS",
    "TERMS",
    "TRAINING_METHODS",
    "MemoryBreakdown",
    "MemoryMeasurement",
    "MemoryScenario",
    "TrainingSetup",
    "comparison_markdown",
    "estimate_memory",
    "format_bytes",
    "measure_memory",
    "plot_breakdowns",
    "saved_activation_bytes",
    "standard_breakdowns",
]
