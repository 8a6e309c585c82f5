"""A multivariate series read, checked and made regular: one row per time step, targets first.

Sources: the built-in series (``co2``: weekly Mauna Loa CO2, ``macro``: quarterly US macro-economic
table, both shipped by statsmodels; ``planted``: generated with a known answer), a .csv/.tsv/.parquet
file or a folder of them, or a Hugging Face dataset name (its train split). Times are parsed and
sorted; duplicated times are an error; missing steps and missing values are filled by linear
interpolation over at most ``data.max_gap`` steps, and a longer gap is an error naming its rows.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd

from tfkit.errors import UsageError

SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
TIME_NAMES = ("date", "time", "timestamp", "datetime", "ds")  # looked for when data.time_column is null
SEASONS = {"H": 24, "h": 24, "D": 7, "B": 5, "W": 52, "M": 12, "MS": 12, "ME": 12, "Q": 4, "QS": 4, "QE": 4}

# the planted series: the target follows the driver PLANTED_LAG steps later; the noise column is noise
PLANTED_LAG = 6
PLANTED_STEPS = 3000


@dataclass
class Series:
    values: np.ndarray  # (steps, variables) float64, the targets first
    names: list[str]  # one per variable
    targets: int  # the first ``targets`` variables are forecast, the rest only inform them
    times: pd.DatetimeIndex | None  # None: the rows' order is the only time there is
    time_column: str | None
    frequency: str | None  # a pandas offset alias ("W-SAT", "QS-OCT"), None with no times
    season: int  # the seasonal period: the seasonal naive forecast and the MASE scale use it

    def __len__(self) -> int:
        return len(self.values)

    def future_times(self, steps: int) -> list[str]:
        """The labels of the ``steps`` steps after the last row."""
        if self.times is None:
            return [str(len(self) + i) for i in range(steps)]
        return [_when(t) for t in pd.date_range(self.times[-1], periods=steps + 1, freq=self.frequency)[1:]]

    def labels(self) -> list[str]:
        if self.times is None:
            return [str(i) for i in range(len(self))]
        return [_when(t) for t in self.times]


# -- the built-in series ----------------------------------------------------------------------------
def co2() -> tuple[pd.DataFrame, dict[str, Any]]:
    from statsmodels.datasets import co2 as source

    frame = source.load_pandas().data.rename_axis("date").reset_index()
    return frame, {"time_column": "date", "targets": ["co2"], "covariates": []}


def macro() -> tuple[pd.DataFrame, dict[str, Any]]:
    from statsmodels.datasets import macrodata

    frame = macrodata.load_pandas().data
    quarters = pd.PeriodIndex.from_fields(year=frame["year"].astype(int), quarter=frame["quarter"].astype(int), freq="Q")
    frame = frame.drop(columns=["year", "quarter"]).assign(quarter=quarters.to_timestamp())
    return frame, {"time_column": "quarter", "targets": ["infl"], "covariates": ["realgdp", "unemp", "tbilrate", "cpi", "m1"]}


def planted(seed: int = 0) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A driver (a smooth random process), the target = the driver PLANTED_LAG steps earlier plus a
    little noise, and a column of pure noise: the answer to "what did the forecast use" is known."""
    rng = np.random.default_rng(seed)
    driver = np.zeros(PLANTED_STEPS)
    for t in range(1, PLANTED_STEPS):
        driver[t] = 0.8 * driver[t - 1] + rng.normal()
    target = np.roll(driver, PLANTED_LAG) + 0.1 * rng.normal(size=PLANTED_STEPS)
    target[:PLANTED_LAG] = 0.0
    frame = pd.DataFrame({"target": target, "driver": driver, "noise": rng.normal(size=PLANTED_STEPS)})
    return frame, {"time_column": None, "targets": ["target"], "covariates": ["driver", "noise"]}


BUILTIN = {"co2": co2, "macro": macro, "planted": planted}


# -- reading ----------------------------------------------------------------------------------------
def read_frame(spec: str, hub_config: str | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The table named by ``data.name`` and the column roles it brings (only the built-ins bring any)."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
        if not files:
            raise UsageError(f"data folder {path} holds no .csv, .tsv or .parquet files")
        if len({p.suffix for p in files}) > 1:
            raise UsageError(f"data folder {path} mixes file types ({', '.join(sorted({p.suffix for p in files}))}): use one")
        return _read_files(files), {}
    if path.suffix in SUFFIXES or path.exists():
        if not path.is_file():
            raise UsageError(f"data file {path} does not exist")
        if path.suffix not in SUFFIXES:
            raise UsageError(f"data file {path} has an unknown format (use .csv, .tsv or .parquet)")
        return _read_files([path]), {}
    try:
        rows = datasets.load_dataset(spec, hub_config, split="train")
    except Exception as e:  # the hub raises many types: offline, unknown name, missing config
        raise UsageError(f"could not load dataset '{spec}' ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return rows.to_pandas(), {}


def _read_files(files: list[Path]) -> pd.DataFrame:
    builder = SUFFIXES[files[0].suffix]
    options = {"delimiter": "\t"} if files[0].suffix == ".tsv" else {}
    try:
        rows = datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train", **options)
    except Exception as e:
        raise UsageError(
            f"could not read {files[0] if len(files) == 1 else files[0].parent} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    return rows.to_pandas()


def make_series(
    frame: pd.DataFrame, roles: dict[str, Any], data: dict[str, Any], where: str, names: list[str] | None = None
) -> Series:
    """The checked, regular series of ``frame``. ``data`` is the config's data section; ``roles`` fill
    the column keys it leaves null; ``names``, when given (a trained run's variables), must all be there."""
    time_column = data["time_column"] if data["time_column"] is not None else roles.get("time_column", _find_time(frame))
    covariates = data["covariates"] if data["covariates"] is not None else roles.get("covariates", [])
    targets = data["targets"] if data["targets"] is not None else roles.get("targets")
    if names is not None:
        missing = [n for n in names if n not in frame.columns]
        if missing:
            raise UsageError(f"{where} has no column {', '.join(map(repr, missing))} (the run was trained on {', '.join(names)})")
    for column in [c for c in [time_column, *(targets or []), *covariates] if c is not None]:
        if column not in frame.columns:
            raise UsageError(
                f"{where} has no column '{column}' (it has: {', '.join(map(str, frame.columns))}; "
                f"set data.time_column, data.targets and data.covariates)"
            )
    if targets is None:
        targets = [c for c in frame.columns if c not in (time_column, *covariates) and pd.api.types.is_numeric_dtype(frame[c])]
        if not targets:
            raise UsageError(f"{where} has no numeric column to forecast (set data.targets)")
    columns = names if names is not None else [*targets, *[c for c in covariates if c not in targets]]
    for column in columns:
        if not pd.api.types.is_numeric_dtype(frame[column]):
            bad = pd.to_numeric(frame[column], errors="coerce").isna() & frame[column].notna()
            raise UsageError(
                f"{where}: column '{column}' is not numeric (row {int(np.flatnonzero(bad)[0]) + 1}: {frame[column][bad].iloc[0]!r})"
            )
    table = frame[columns].astype("float64")
    times, frequency = None, None
    if time_column is not None:
        times = _parse_times(frame[time_column], where, time_column)
        table.index = times
        table = table.sort_index()
        repeated = table.index[table.index.duplicated()]
        if len(repeated):
            raise UsageError(
                f"{where}: {len(repeated)} duplicated times in '{time_column}', the first {_when(repeated[0])} (keep one row per time)"
            )
        frequency = data["frequency"] or _infer_frequency(table.index, where)
        try:
            grid = pd.date_range(table.index[0], table.index[-1], freq=frequency)
        except ValueError as e:
            raise UsageError(f"data.frequency '{frequency}' is not a pandas offset alias ({e})") from None
        off_grid = table.index.difference(grid)
        if len(off_grid):
            raise UsageError(
                f"{where}: {len(off_grid)} times are not on a regular {frequency} grid, the first {_when(off_grid[0])} "
                f"(set data.frequency, or resample the data)"
            )
        table = table.reindex(grid)  # missing steps become missing values
        times = table.index
    values = _fill(table, data["max_gap"], where)
    season = data["season"] if data["season"] is not None else _season(frequency)
    target_count = len(targets) if names is None else len(names) - len(covariates)
    return Series(values, list(columns), target_count, times, time_column, frequency, season)


def _when(label) -> str:
    """A time as people write it: the date alone when it is midnight."""
    if isinstance(label, pd.Timestamp) and label == label.normalize():
        return str(label.date())
    return str(label)


def _find_time(frame: pd.DataFrame) -> str | None:
    for column in frame.columns:
        if str(column).lower() in TIME_NAMES:
            return column
    return None


def _parse_times(column: pd.Series, where: str, name: str) -> pd.DatetimeIndex:
    parsed = (
        pd.to_datetime(column, errors="coerce", format="mixed") if not pd.api.types.is_datetime64_any_dtype(column) else column
    )
    bad = parsed.isna()
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise UsageError(f"{where}: time column '{name}' row {row + 1} is not a time: {column.iloc[row]!r}")
    return pd.DatetimeIndex(parsed)


def _infer_frequency(times: pd.DatetimeIndex, where: str) -> str:
    with warnings.catch_warnings():  # pandas 3 warns that infer_freq will return an offset: take either
        warnings.simplefilter("ignore")
        inferred = pd.infer_freq(times) if len(times) >= 3 else None
    frequency = getattr(inferred, "freqstr", inferred)
    if frequency is None:  # gaps defeat infer_freq: take the most common step, where it is a fixed length
        steps = pd.Series(times[1:] - times[:-1]).value_counts()
        step = steps.index[0] if len(steps) else None
        if step is None or step.days >= 28:  # months and quarters have no fixed length
            raise UsageError(f"{where}: cannot tell the series' time step (set data.frequency, e.g. D, W-SAT, MS, QS)")
        frequency = pd.tseries.frequencies.to_offset(step).freqstr
    return frequency


def _season(frequency: str | None) -> int:
    if frequency is None:
        return 1
    base = frequency.split("-")[0].lstrip("0123456789")
    return SEASONS.get(base, 1)


def _fill(table: pd.DataFrame, max_gap: int, where: str) -> np.ndarray:
    """Linear interpolation over runs of at most ``max_gap`` missing values (the nearest value at the
    ends); a longer run is an error naming its rows."""
    labels = table.index
    for column in table.columns:
        missing = table[column].isna().to_numpy()
        if missing.all():
            raise UsageError(f"{where}: column '{column}' has no values")
        edges = np.flatnonzero(np.diff(np.r_[0, missing.astype(np.int8), 0]))
        for start, stop in zip(edges[::2], edges[1::2]):
            if stop - start > max_gap:
                raise UsageError(
                    f"{where}: column '{column}' misses {stop - start} values in a row, at {_when(labels[start])}..{_when(labels[stop - 1])} "
                    f"(more than data.max_gap={max_gap}: fill them, or raise data.max_gap)"
                )
    filled = int(table.isna().to_numpy().sum())
    if filled:
        print(f"note: {where}: {filled} missing values filled by linear interpolation", file=sys.stderr)
    return table.interpolate(limit_direction="both").to_numpy(dtype=np.float64)
