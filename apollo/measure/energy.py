"""Energy (kWh) and emissions (kg CO2eq) of a run's training steps, with codecarbon (``--energy auto|on``).

The interval is the one ``wall_s`` counts: the training steps (growth included), not the evaluation passes nor
the checkpoint writes between them (LiGO's operator phase counts whole, its few checkpoint writes included). The
loop calls ``resume()`` as a step starts and ``pause()`` before each evaluation or checkpoint; each stretch in
between is one codecarbon task (``start_task`` / ``stop_task`` of an ``OfflineEmissionsTracker``), so the
cumulative energy written into each ``eval`` record is exact at that evaluation, and it is checkpointed with the
other counters (a resumed run goes on counting).

codecarbon reads RAPL (Intel/AMD CPU package counters, /sys/class/powercap) and NVML (NVIDIA GPUs) where the
machine has them: *measured*. Elsewhere it estimates the CPU from a TDP model (its table's TDP for the CPU model,
or 4 W per thread when the model is unknown) times the CPU load: *estimated*. RAM is always estimated (its RAM
power model). summary.json says which (``energy_method``). CO2 = kWh x the country's grid intensity (codecarbon's
offline table; ``--country-iso-code``). Offline, quiet, and nothing written: no emissions.csv, no lock file, no
network (no Electricity Maps token is used even if a codecarbon config sets one).
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path

from ..config import ApolloError, TrainConfig

ENERGY_MODES = ("off", "auto", "on")
TRACKING_MODES = ("process", "machine")
INSTALL = "pip install codecarbon"
COUNTERS = ("energy_kwh", "emissions_kg", "energy_cpu_kwh", "energy_gpu_kwh", "energy_ram_kwh")
# codecarbon's CPU modes that read hardware energy counters
_COUNTER_MODES = {"intel_rapl": "RAPL counters", "windows_emi": "the Windows Energy Meter (RAPL)",
                  "intel_power_gadget": "Intel Power Gadget"}


def _codecarbon():
    """The codecarbon module, or None when it is not installed (or does not import)."""
    try:
        return importlib.import_module("codecarbon")
    except Exception:
        return None


def check(t: TrainConfig) -> None:
    """Reject bad energy settings, and ``--energy on`` without codecarbon, before anything is written."""
    if t.energy not in ENERGY_MODES:
        raise ApolloError(f"unknown --energy {t.energy!r} (choose from {', '.join(ENERGY_MODES)})")
    if t.energy_tracking_mode not in TRACKING_MODES:
        raise ApolloError(f"unknown --energy-tracking-mode {t.energy_tracking_mode!r} (choose from "
                          f"{', '.join(TRACKING_MODES)})")
    if t.energy == "off":
        return
    if not re.fullmatch(r"[A-Za-z]{3}", t.country_iso_code):
        raise ApolloError(f"--country-iso-code must be a 3-letter ISO code (e.g. USA, FRA, DEU), got "
                          f"{t.country_iso_code!r}")
    if _codecarbon() is None:
        if t.energy == "on":
            raise ApolloError(f"--energy on needs codecarbon: {INSTALL}")
        return
    from codecarbon.input import DataSource

    if t.country_iso_code.upper() not in DataSource().get_global_energy_mix_data():
        raise ApolloError(f"--country-iso-code {t.country_iso_code!r} is not in codecarbon's energy-mix table")


def describe(tracker) -> tuple[str, dict]:
    """What codecarbon did on this machine: ``("measured: ..." | "estimated: ...", {part: how})``.

    "measured" when the processors' energy (CPU, and GPUs if any) comes from hardware counters (RAPL, NVML, ...);
    RAM, which codecarbon always models, is then the only estimated part. "estimated" when the CPU's power comes
    from the TDP model (or a constant)."""
    detail, estimated = {}, False
    for hw in getattr(tracker, "_hardware", []):  # codecarbon's detected hardware (no public accessor)
        kind = type(hw).__name__
        if kind == "CPU":
            mode = getattr(hw, "_mode", "")
            if mode in _COUNTER_MODES:
                detail["cpu"] = f"measured by {_COUNTER_MODES[mode]}"
                continue
            estimated = True
            tdp, model = getattr(hw, "_tdp", None), getattr(hw, "_model", None) or "unknown CPU"
            threads = getattr(hw, "_cpu_count", None)
            note = ""
            if getattr(hw, "_is_generic_tdp", False):
                note = ": codecarbon's generic constant, the CPU model is not in its table"
            elif threads and tdp == 4 * threads:  # codecarbon's default for an unknown model: 4 W per thread
                note = f" = 4 W x {threads} threads, codecarbon's default for a CPU model not in its table"
            rule = "TDP x CPU load" if mode == "cpu_load" else "a constant share of TDP"
            detail["cpu"] = f"estimated from {rule} (TDP {tdp} W for {model!r}{note})"
        elif kind == "GPU":
            detail["gpu"] = "measured by NVML (NVIDIA) / AMD SMI counters"
        elif kind == "RAM":
            detail["ram"] = "estimated by codecarbon's RAM power model"
        elif kind in ("AppleSiliconChip", "Raspberry"):
            part = str(getattr(hw, "chip_part", "CPU")).lower()
            detail[part] = f"measured by {'powermetrics' if kind == 'AppleSiliconChip' else 'the PMIC'}"
    detail.setdefault("gpu", "none found")
    parts = [f"{part.upper()} {detail[part]}" for part in ("cpu", "gpu", "ram") if part in detail]
    return ("estimated" if estimated else "measured") + ": " + "; ".join(parts), detail


class EnergyMeter:
    """Counts the energy of the training steps into ``state`` (``COUNTERS``); a context manager.

    Inactive (every method a no-op, ``fields()`` empty) with ``--energy off``, on ranks > 0, and with ``--energy
    auto`` when codecarbon is missing. A codecarbon failure mid-run never stops the run: the meter stops and
    summary.json says why."""

    def __init__(self, t: TrainConfig, out: Path, state: dict, main: bool = True, first: int = 0):
        self.state, self.tracker, self.running, self.method, self.detail = state, None, False, None, None
        self.note = "not measured (--energy off)" if t.energy == "off" else None
        if t.energy == "off" or not main:
            return
        if _codecarbon() is None:  # --energy on without it was refused by check()
            self.note = f"not measured: codecarbon is not installed ({INSTALL})"
            return
        if first and "energy_kwh" not in state:  # resumed from a checkpoint written without --energy
            state["energy_from_step"] = first
        for key in COUNTERS:
            state.setdefault(key, 0.0)
        self.t, self.out = t, Path(out)

    def _fail(self, what: str, error: Exception) -> None:
        self.tracker, self.running = None, False
        self.note = f"stopped: codecarbon failed to {what} ({type(error).__name__}: {error})"

    def __enter__(self) -> EnergyMeter:
        if not hasattr(self, "t"):
            return self
        try:
            from codecarbon import OfflineEmissionsTracker

            logging.getLogger("codecarbon").setLevel(logging.ERROR)  # before construction: it logs while set up
            self.tracker = OfflineEmissionsTracker(
                country_iso_code=self.t.country_iso_code.upper(), output_dir=str(self.out), output_methods=[],
                emissions_endpoint=None, electricitymaps_api_token="", log_level="error", allow_multiple_runs=True,
                tracking_mode=self.t.energy_tracking_mode, project_name="apollo")
            # allow_multiple_runs: no /tmp lock file, and no SIGINT/SIGTERM handlers replacing the run's own.
            # A first task probes the hardware (seconds: the CPU's TDP lookup) here, not inside a timed step.
            self.tracker.start_task("probe")
            self.tracker.stop_task()
            self.method, self.detail = describe(self.tracker)
        except Exception as e:
            self._fail("start", e)
        return self

    def resume(self) -> None:
        """Start counting (as a training step starts); a no-op while counting."""
        if self.tracker is not None and not self.running:
            try:
                self.tracker.start_task("train")
                self.running = True
            except Exception as e:
                self._fail("start a measurement", e)

    def pause(self) -> None:
        """Stop counting and add the stretch since ``resume()`` to the counters (before an evaluation)."""
        if not self.running:
            return
        self.running = False
        try:
            data = self.tracker.stop_task()
        except Exception as e:
            self._fail("stop a measurement", e)
            return
        if data is None:
            return
        for key, value in zip(COUNTERS, (data.energy_consumed, data.emissions, data.cpu_energy, data.gpu_energy,
                                         data.ram_energy), strict=True):
            self.state[key] += float(value or 0.0)

    def fields(self) -> dict:
        """The cumulative energy and emissions for a metrics.jsonl record (empty when not measuring)."""
        if self.tracker is None:
            return {}
        return {"energy_kwh": self.state["energy_kwh"], "emissions_kg": self.state["emissions_kg"]}

    def close(self) -> None:
        self.pause()
        tracker, self.tracker = self.tracker, None
        if tracker is not None:
            try:
                tracker.stop()
            except Exception:
                pass

    def __exit__(self, *exc) -> None:
        self.close()

    def summary(self) -> dict:
        """summary.json's energy fields: totals (None when not measured), how they were obtained, and the detail."""
        if self.method is None or self.note is not None and self.note.startswith("stopped"):
            return {"energy_kwh": None, "emissions_kg": None, "energy_method": self.note, "energy_detail": None}
        s = self.state
        detail = {**self.detail, "cpu_kwh": s["energy_cpu_kwh"], "gpu_kwh": s["energy_gpu_kwh"],
                  "ram_kwh": s["energy_ram_kwh"], "country_iso_code": self.t.country_iso_code.upper(),
                  "tracking_mode": self.t.energy_tracking_mode,
                  "interval": "training steps (as wall_s: evaluation and checkpoint writes excluded)",
                  "codecarbon": getattr(_codecarbon(), "__version__", None)}
        if "energy_from_step" in s:
            detail["interval"] += f"; from step {s['energy_from_step']} only (resumed from a run without --energy)"
        return {"energy_kwh": s["energy_kwh"], "emissions_kg": s["emissions_kg"], "energy_method": self.method,
                "energy_detail": detail}
