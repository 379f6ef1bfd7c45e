"""RunOptions: how `run_merge` runs a plan (what `mergeflow run`'s execution flags set),
checked when made."""

from __future__ import annotations

from dataclasses import dataclass, fields

from mergeflow.errors import MergeflowError
from mergeflow.exec.budget import BASELINE
from mergeflow.spec.sizes import parse_size

SCHEDULERS = ("distributed", "threads", "sync")
NO_DASHBOARD = "none"


@dataclass(frozen=True)
class RunOptions:
    """How `run_merge` runs a plan. Sizes are bytes (an int) or text as Dask reads it
    ("100KB", "4GB", "4GiB"); `memory_limit` also takes "auto" (the machine's memory shared
    among the workers). `dashboard_address=None` (or "none") starts no dashboard.
    Invalid values raise MergeflowError when the options are made."""

    scheduler: str = "distributed"  # distributed | threads | sync
    workers: int | None = None
    threads_per_worker: int | None = None
    processes: bool = False
    memory_limit: int | str | None = None  # per worker
    dashboard_address: str | None = "127.0.0.1:8787"
    scheduler_address: str | None = None
    device: str = "cpu"
    resume: bool = False
    force: bool = False
    quiet: bool = False
    # what OUT gets besides the tensors (mergekit-yaml's flags of the same names)
    copy_tokenizer: bool = True  # False: no tokenizer files unless the config builds one
    write_model_card: bool = True  # False: no README.md and no mergekit_config.yml
    safe_serialization: bool = True  # False: pytorch_model*.bin (output/bin.py)

    cli: bool = False  # errors name command-line flags (--force), not these fields (force=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory_limit", self._memory_limit())
        object.__setattr__(self, "dashboard_address", self._dashboard_address())

    def term(self, name: str, value: object = True) -> str:
        """How the user spells option `name` set to `value`: `--force`, `--memory-limit`
        (CLI) or `force=True`, `memory_limit` (RunOptions)."""
        if self.cli:
            return "--" + name.replace("_", "-") + ("" if isinstance(value, bool) or value is None else f" {value}")
        return name if value is None else f"{name}={value!r}"

    def _memory_limit(self) -> int | str | None:
        from mergeflow.spec.sizes import human_bytes

        value, name = self.memory_limit, self.term("memory_limit", None)
        if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
            return value
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise MergeflowError(f"{name}: {value!r} is not a size; give bytes or text like 4GB")
        if isinstance(value, str):
            try:  # the one size reader, as for --memory-limit
                value = parse_size(value)
            except ValueError as e:
                raise MergeflowError(f"{name}: {e}") from None
        if value < BASELINE:
            raise MergeflowError(
                f"{name} {self.memory_limit}: below the {human_bytes(BASELINE)} a worker needs "
                f"before its first tensor (Python, torch and Dask); give at least "
                f"{human_bytes(BASELINE)}, or no limit")
        return value

    def _dashboard_address(self) -> str | None:
        address = self.dashboard_address
        if address is None or address.strip().lower() in (NO_DASHBOARD, ""):
            return None
        host, colon, port = address.strip().rpartition(":")
        if not colon or not port.isdigit() or int(port) > 65535 or " " in host:
            raise MergeflowError(f"{self.term('dashboard_address', address)}: not an address; "
                                 "give HOST:PORT like 127.0.0.1:8787 (port 0: any free port), or "
                                 f"{self.term('dashboard_address', NO_DASHBOARD)} for no dashboard")
        return address.strip()

    def replace(self, **changes) -> RunOptions:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return RunOptions(**{**values, **changes})
